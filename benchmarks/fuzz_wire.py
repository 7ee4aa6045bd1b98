"""Fuzz wire.decode with hypothesis: whatever arrives off the network, only WireError may escape.

    .venv/bin/python benchmarks/fuzz_wire.py [--cases N]        # default N = 10000, a minute or so on 2 cores

Strategies, N split between them (each one a hypothesis run, derandomized: the same N gives the same cases):

    random_bytes       one frame of random bytes (sometimes > 64 KiB)
    random_frames      0-8 frames of random bytes or of odd objects (non-contiguous, 2-D, Fortran-order
                       buffers, str, int, None), in a list / tuple / generator, or a bare bytes object
    msgpack_headers    msgpack headers built from the protocol's keys with a mix of valid, wrong-typed and
                       random values (including tensor entries and codec fields), with payload frames
                       that match the header's nbytes or not
    mutated_<codec>    a valid block/hello/bye/resync message of that codec (raw, bf16, fp16, int8), then
                       0-4 mutations: flip/set/truncate/extend bytes of the header or a payload frame,
                       drop/insert/duplicate/swap frames, or re-pack the header with a field replaced,
                       deleted or added (top-level or in a tensor entry)

Each case calls decode(frames, max_payload_bytes=...) (the limit drawn: none, or a size around the
payload). Oracle: decode returns a Message of finite float32 tensors or raises WireError with a reason
from wire.REASONS other than "internal" and a one-line message; anything else is a crash. An unmutated
valid message must decode to exactly what encode_with_roundtrip predicted.

Writes benchmarks/results/fuzz_wire.md and fuzz_wire.png (rejection reasons); prints the headline last.
Exit status 1 if any case crashed (details in the Markdown report).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deca_p2p import wire  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CODEC_NAMES = sorted(wire.CODECS)
# share of N per strategy (the mutated share is split evenly between the codecs)
SHARES = {"random_bytes": 0.10, "random_frames": 0.15, "msgpack_headers": 0.30}
MUTATED_SHARE = 0.45

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------ bookkeeping


class Stats:
    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)  # strategy -> reason / "accepted" / "crash"
        self.max_case_s: dict[str, float] = defaultdict(float)
        self.crashes: list[dict] = []


STATS = Stats()


def _describe(frames, limit: int = 400) -> str:
    try:
        if isinstance(frames, list):
            parts = []
            for f in frames:
                try:
                    b = bytes(memoryview(getattr(f, "buffer", f)).cast("B")) if not isinstance(f, (str, int)) else None
                except Exception:
                    b = None
                parts.append(f"{type(f).__name__}({len(b)}):{b[:64].hex()}" if b is not None else repr(f)[:80])
            s = "[" + ", ".join(parts) + "]"
        else:
            s = repr(frames)
    except Exception as e:  # pragma: no cover - the description must never crash the fuzzer
        s = f"<undescribable {type(frames).__name__}: {e}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check(strategy: str, frames, max_payload_bytes, expect=None) -> None:
    """Run decode once and judge the outcome; ``expect`` (name -> predicted tensor) must decode exactly."""
    desc = _describe(frames) if isinstance(frames, list) else None  # before decode consumes a generator
    STATS.cases[strategy] += 1
    t0 = time.perf_counter()
    outcome, crash = "accepted", None
    try:
        msg = wire.decode(frames, max_payload_bytes=max_payload_bytes)
    except wire.WireError as e:
        outcome = e.reason
        if e.reason == "internal" or e.reason not in wire.REASONS:
            crash = f"WireError reason {e.reason!r}: {e}"
        elif "\n" in str(e):
            crash = f"multi-line WireError message: {str(e)!r}"
    except BaseException as e:  # noqa: BLE001 - anything but WireError is exactly what we are looking for
        if isinstance(e, KeyboardInterrupt):
            raise
        crash = f"{type(e).__name__} escaped decode: {e}\n{traceback.format_exc(limit=6)}"
    else:
        problems = []
        if not isinstance(msg, wire.Message):
            problems.append(f"decode returned {type(msg).__name__}")
        else:
            for name, t in msg.tensors.items():
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                    problems.append(f"tensor {name!r} is not finite float32")
            if expect is not None:
                if list(msg.tensors) != list(expect):
                    problems.append("decoded names differ from the encoded message's")
                else:
                    for k, want in expect.items():
                        got = msg.tensors[k]
                        if got.shape != want.shape or not torch.equal(got.view(torch.int32), want.float().contiguous().view(torch.int32)):
                            problems.append(f"tensor {k!r} is not what encode_with_roundtrip predicted")
        if problems:
            crash = "; ".join(problems)
    dt = time.perf_counter() - t0
    STATS.max_case_s[strategy] = max(STATS.max_case_s[strategy], dt)
    if crash is not None:
        STATS.outcomes[strategy]["crash"] += 1
        STATS.crashes.append({"strategy": strategy, "error": crash, "input": desc or _describe(frames),
                              "max_payload_bytes": max_payload_bytes})
    else:
        STATS.outcomes[strategy][outcome] += 1


# ------------------------------------------------------------------------------------------- strategies


def _fill(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# big frames cheaply: a size (around the header limit, or up to 256 KiB) and a seed
big_bytes = st.builds(
    _fill,
    st.one_of(st.integers(wire.MAX_HEADER_BYTES - 16, wire.MAX_HEADER_BYTES + 16), st.integers(0, 1 << 18)),
    st.integers(0, 2**32 - 1),
)
small_bytes = st.binary(max_size=256)
any_bytes = st.one_of(small_bytes, small_bytes, small_bytes, big_bytes)


def _as_frame(b: bytes, how: str):
    if how == "bytes":
        return bytes(b)
    if how == "bytearray":
        return bytearray(b)
    if how == "memoryview":
        return memoryview(b)
    return zmq.Frame(bytes(b))


frame_kind = st.sampled_from(["bytes", "bytearray", "memoryview", "zmq"])


def _odd_object(kind: int, b: bytes):
    arr = np.frombuffer(b + b"\0" * (-len(b) % 8), dtype=np.float32)
    if kind == 0:
        return memoryview(b)[::2]  # non-contiguous 1-D buffer
    if kind == 1:
        return np.ascontiguousarray(arr.reshape(-1, 2)) if arr.size % 2 == 0 and arr.size else arr  # 2-D C buffer
    if kind == 2:
        return np.asfortranarray(np.resize(arr, (3, 4)))  # Fortran-order 2-D buffer
    if kind == 3:
        return b.decode("latin-1")  # str
    if kind == 4:
        return len(b)  # int
    if kind == 5:
        return None
    if kind == 6:
        return list(b[:8])  # list of ints
    return memoryview(arr)  # format "f"


odd_frame = st.builds(_odd_object, st.integers(0, 7), small_bytes)
frame_obj = st.one_of(st.builds(_as_frame, any_bytes, frame_kind), st.builds(_as_frame, any_bytes, frame_kind), odd_frame)


@st.composite
def frame_containers(draw):
    frames = draw(st.lists(frame_obj, max_size=8))
    how = draw(st.sampled_from(["list", "list", "list", "tuple", "generator", "bare"]))
    if how == "tuple":
        return tuple(frames)
    if how == "generator":
        return (f for f in frames)
    if how == "bare":
        return draw(st.one_of(any_bytes, st.none(), st.integers(), st.text(max_size=8)))
    return frames


payload_limit = st.one_of(st.none(), st.none(), st.integers(0, 1 << 20))

# random msgpack-able values (ext types included: the decoder allows none)
mp_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.floats(width=32),
    st.text(max_size=20), st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
mp_value = st.recursive(
    mp_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), c, max_size=4),
    max_leaves=12,
)
u63 = st.integers(0, 2**63 - 1)
bad_int = st.one_of(st.integers(-(2**63), -1), st.integers(2**63, 2**64 - 1), st.booleans(), st.floats(), st.text(max_size=4))
shape_st = st.lists(st.integers(0, 6), max_size=3)
bad_shape = st.one_of(
    st.lists(st.integers(-3, 2**41), max_size=4), st.lists(st.integers(0, 1), min_size=33, max_size=40),
    st.lists(st.sampled_from([2**20, 2**25, 2**30]), min_size=2, max_size=3), mp_value,
)
tensor_names = st.one_of(st.sampled_from(["w", "b", "model.layers.0.mlp.up_proj.weight"]),
                         st.text(max_size=12), st.just("x" * (wire.MAX_NAME_LEN + 1)))


def _pick(draw, good, bad, p_good: float = 0.85):
    return draw(good) if draw(st.floats(0, 1)) < p_good else draw(bad)


@st.composite
def plausible_message(draw):
    """A hand-built header from the protocol's keys, mostly right, sometimes wrong, plus payload frames."""
    codec = _pick(draw, st.sampled_from(CODEC_NAMES), st.one_of(st.text(max_size=6), mp_value))
    codec_obj = wire.CODECS.get(codec) if isinstance(codec, str) else None
    kind = _pick(draw, st.sampled_from(["block", "block", *wire.KINDS]), st.one_of(st.text(max_size=6), mp_value))
    entries, payloads = [], []
    for i in range(draw(st.integers(0, 4))):
        wire_dtypes = sorted(codec_obj.wire_dtypes) if codec_obj else sorted(wire.DTYPES)
        dname = _pick(draw, st.sampled_from(wire_dtypes), st.one_of(st.sampled_from(["float64", "int32", "uint8", *wire.DTYPES]), mp_value))
        shape = _pick(draw, shape_st, bad_shape)
        itemsize = wire.DTYPES[dname].itemsize if isinstance(dname, str) and dname in wire.DTYPES else 4
        numel = math.prod(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else 0
        good_nbytes = numel * itemsize if 0 <= numel * itemsize <= 1 << 16 else 0
        nbytes = _pick(draw, st.just(good_nbytes), st.one_of(st.integers(-10, 1 << 16), bad_int, mp_value))
        e = {"name": _pick(draw, st.just(f"t{i}"), tensor_names), "dtype": dname, "shape": shape, "nbytes": nbytes}
        if codec == "int8" or draw(st.integers(0, 9)) == 0:
            e["scale"] = _pick(draw, st.floats(0, 1e3, width=32), st.one_of(st.floats(), mp_value))
        if draw(st.integers(0, 9)) == 0:  # drop or add a key
            if draw(st.booleans()) and e:
                e.pop(draw(st.sampled_from(sorted(e))))
            else:
                e[draw(st.text(max_size=6))] = draw(mp_value)
        entries.append(e if draw(st.integers(0, 19)) else draw(mp_value))
        # a payload frame: the header's length (random bytes or finite values), or any length
        n = nbytes if type(nbytes) is int and 0 <= nbytes <= 1 << 16 else draw(st.integers(0, 512))
        how = draw(st.sampled_from(["random", "finite", "finite", "length"]))
        if how == "random":
            payloads.append(_fill(n, draw(st.integers(0, 2**32 - 1))))
        elif how == "finite":
            payloads.append(np.zeros(n, dtype=np.uint8).tobytes() if draw(st.booleans()) else
                            np.full(n // 2, 0x3C00, dtype=np.uint16).tobytes() + b"\0" * (n % 2))
        else:
            payloads.append(_fill(draw(st.integers(0, 512)), 7))
    header = {
        "v": _pick(draw, st.just(wire.VERSION), st.one_of(st.integers(-2, 3), mp_value), 0.9),
        "kind": kind,
        **{k: _pick(draw, u63, bad_int, 0.93) for k in ("src", "inc", "round", "block", "step")},
        "codec": codec,
        "full": _pick(draw, st.booleans(), st.one_of(st.integers(0, 1), mp_value), 0.93),
        "tensors": entries if draw(st.integers(0, 19)) else draw(mp_value),
        "stats": _pick(draw, st.dictionaries(st.text(min_size=1, max_size=10), st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1)), max_size=4),
                       st.one_of(mp_value, st.dictionaries(st.text(max_size=200), st.floats(), max_size=3),
                                 st.dictionaries(st.text(max_size=3), st.floats(), min_size=257, max_size=260))),
    }
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 4)) == 0 else 0):
        if draw(st.booleans()):
            header.pop(draw(st.sampled_from(sorted(header))), None)
        else:
            header[draw(st.one_of(st.text(max_size=6), st.sampled_from(sorted(wire._HEADER_KEYS))))] = draw(mp_value)
    blob = msgpack.packb(header, use_bin_type=draw(st.booleans()))
    if draw(st.integers(0, 19)) == 0:
        blob += draw(st.binary(min_size=1, max_size=8))  # trailing data after the map
    frames = [blob, *payloads]
    if draw(st.integers(0, 9)) == 0 and frames[1:]:
        frames.pop(draw(st.integers(1, len(frames) - 1)))  # one payload frame missing
    return [_as_frame(f, draw(frame_kind)) for f in frames]


values_f32 = st.floats(min_value=-6e4, max_value=6e4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def valid_message(draw, codec: str):
    kind = draw(st.sampled_from(["block"] * 6 + ["hello", "bye", "resync"]))
    tensors = {}
    if kind == "block":
        for i in range(draw(st.integers(0, 3))):
            shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
            n = math.prod(shape)
            vals = draw(st.lists(values_f32, min_size=n, max_size=n))  # |x| <= 6e4: finite in float16 too
            t = torch.tensor(vals, dtype=torch.float32).reshape(shape)
            tensors[draw(st.sampled_from(["w", "b", "model.layers.0.self_attn.q_proj.weight"])) + f".{i}"] = \
                t.to(draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])))
    msg = wire.Message(kind, src=draw(u63), inc=draw(u63), round=draw(st.integers(0, 50)), block=draw(st.integers(0, 8)),
                       step=draw(st.integers(0, 40)), codec=codec, full=draw(st.booleans()), tensors=tensors,
                       stats=draw(st.dictionaries(st.sampled_from(["loss", "grad_norm", "m_norm"]), st.floats(-10, 10), max_size=3)))
    frames, predicted = wire.encode_with_roundtrip(msg)
    return [bytes(f) for f in frames], predicted


MUTATIONS = ["flip", "set", "truncate", "extend", "drop_frame", "insert_frame", "dup_frame", "swap_frames",
             "header_field", "header_field", "tensor_field", "tensor_field", "non_finite", "non_finite"]
# NaN / Inf bit patterns of the wire dtypes (float32, float16, bfloat16), written into a payload frame
NON_FINITE = [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\xff", b"\x00\x7c", b"\x01\x7e", b"\x80\x7f", b"\xc0\xff"]
field_values = st.one_of(mp_value, bad_int, st.integers(-2, 3), st.sampled_from(["block", "raw", "int8", "float64", "bfloat16"]),
                         st.floats(allow_nan=True), shape_st, bad_shape)


def _mutate(draw, frames: list[bytearray]) -> str:
    op = draw(st.sampled_from(MUTATIONS))
    if not frames:
        frames.append(bytearray(draw(small_bytes)))
        return "insert_frame"
    i = draw(st.integers(0, len(frames) - 1))
    if draw(st.integers(0, 2)) == 0:
        i = 0  # the header more often than its share
    f = frames[i]
    if op == "non_finite" and len(frames) > 1:
        f = frames[draw(st.integers(1, len(frames) - 1))]
        pat = draw(st.sampled_from(NON_FINITE))
        if len(f) >= len(pat):
            j = draw(st.integers(0, (len(f) - len(pat)) // len(pat))) * len(pat)  # element-aligned
            f[j:j + len(pat)] = pat
    elif op in ("flip", "set") and f:
        j = draw(st.integers(0, len(f) - 1))
        f[j] = (f[j] ^ draw(st.integers(1, 255))) if op == "flip" else draw(st.integers(0, 255))
    elif op == "truncate":
        del f[draw(st.integers(0, len(f))):]
    elif op == "extend":
        f.extend(draw(st.binary(min_size=1, max_size=64)))
    elif op == "drop_frame":
        frames.pop(i)
    elif op == "insert_frame":
        frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(small_bytes)))
    elif op == "dup_frame":
        frames.insert(i, bytearray(f))
    elif op == "swap_frames" and len(frames) > 1:
        k = draw(st.integers(0, len(frames) - 1))
        frames[i], frames[k] = frames[k], frames[i]
    elif op in ("header_field", "tensor_field"):
        try:
            h = msgpack.unpackb(bytes(frames[0]), raw=False, strict_map_key=False)
        except Exception:
            return op + "(unparsable)"
        if not isinstance(h, dict):
            return op + "(not a map)"
        target = h
        if op == "tensor_field":
            ts = h.get("tensors")
            if not (isinstance(ts, list) and ts and isinstance(ts[0], dict)):
                return op + "(no tensors)"
            target = ts[draw(st.integers(0, len(ts) - 1))]
        keys = sorted(map(str, target)) + ["extra"]
        key = draw(st.sampled_from(keys))
        how = draw(st.sampled_from(["replace", "replace", "replace", "delete"]))
        if how == "delete":
            target.pop(key, None)
        else:
            target[key] = draw(field_values)
        frames[0] = bytearray(msgpack.packb(h, use_bin_type=True))
    return op


# ------------------------------------------------------------------------------------------------- runs


def _settings(n: int, name: str):
    """derandomize=True, and a fixed seed per strategy (a seed overrides derandomize): without it every
    strategy's ``body`` below would hash to the same digest and draw the same random stream."""
    conf = settings(max_examples=n, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=True)

    def deco(test):
        return seed(zlib.crc32(name.encode()))(conf(test))
    return deco


def run_strategy(name: str, n: int) -> None:
    if name == "random_bytes":
        @_settings(n, name)
        @given(any_bytes, frame_kind, payload_limit)
        def body(b, how, limit):
            check(name, [_as_frame(b, how)], limit)
    elif name == "random_frames":
        @_settings(n, name)
        @given(frame_containers(), payload_limit)
        def body(frames, limit):
            check(name, frames, limit)
    elif name == "msgpack_headers":
        @_settings(n, name)
        @given(plausible_message(), payload_limit)
        def body(frames, limit):
            check(name, frames, limit)
    else:
        codec = name.split("_", 1)[1]

        @_settings(n, name)
        @given(valid_message(codec), st.data())
        def body(base, data):
            frames, predicted = base
            frames = [bytearray(f) for f in frames]
            n_mut = data.draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4]))
            for _ in range(n_mut):
                _mutate(data.draw, frames)
            payload = sum(len(f) for f in frames[1:])
            limit = data.draw(st.one_of(st.none(), st.none(), st.integers(max(0, payload - 8), payload + 8)))
            out = [_as_frame(bytes(f), data.draw(frame_kind)) for f in frames]
            check(name, out, limit, predicted if n_mut == 0 and (limit is None or limit >= payload) else None)
    body()


def allocate(total: int) -> dict[str, int]:
    names = [*SHARES, *(f"mutated_{c}" for c in CODEC_NAMES)]
    shares = [*SHARES.values(), *([MUTATED_SHARE / len(CODEC_NAMES)] * len(CODEC_NAMES))]
    counts = [int(total * s) for s in shares]
    for k in range(total - sum(counts)):  # hand out the rounding remainder
        counts[k % len(counts)] += 1
    return dict(zip(names, counts))


def write_report(args, plan: dict[str, int], wall: float) -> tuple[int, int]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    total = sum(STATS.cases.values())
    crashes = len(STATS.crashes)
    reasons = Counter()
    for c in STATS.outcomes.values():
        reasons.update({k: v for k, v in c.items() if k not in ("accepted", "crash")})
    cmd = ".venv/bin/python benchmarks/fuzz_wire.py" + (f" --cases {args.cases}" if args.cases != 10000 else "")
    lines = [
        "# Fuzzing wire.decode (hypothesis)", "",
        f"Command: `{cmd}` (hypothesis {__import__('hypothesis').__version__}, derandomized with a fixed seed per "
        f"strategy: the same command runs the same cases; msgpack {'.'.join(map(str, msgpack.version))}, torch {torch.__version__}).", "",
        f"**{total} cases, {crashes} crashes** (a crash: any exception other than WireError, a WireError with "
        "reason `internal` or outside wire.REASONS, a multi-line message, a non-finite or non-float32 decoded "
        "tensor, or an unmutated valid message not decoding to what the sender predicted). "
        f"Wall time {wall:.1f} s on {__import__('os').cpu_count()} cores.", "",
        "| strategy | planned | cases run | accepted | rejected | crashes | slowest case ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n in plan.items():
        o = STATS.outcomes[name]
        rej = sum(v for k, v in o.items() if k not in ("accepted", "crash"))
        lines.append(f"| {name} | {n} | {STATS.cases[name]} | {o['accepted']} | {rej} | {o['crash']} | "
                     f"{1e3 * STATS.max_case_s[name]:.1f} |")
    acc = sum(o["accepted"] for o in STATS.outcomes.values())
    lines.append(f"| **total** | {sum(plan.values())} | {total} | {acc} | {sum(reasons.values())} | {crashes} | "
                 f"{1e3 * max(STATS.max_case_s.values(), default=0):.1f} |")
    lines += ["", "Rejections by WireError reason (columns: strategies):", ""]
    cols = list(plan)
    short = {c: c.replace("mutated_", "mut_").replace("msgpack_headers", "msgpack").replace("random_", "rand_") for c in cols}
    lines.append("| reason | " + " | ".join(short[c] for c in cols) + " | total |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))
    for r, v in reasons.most_common():
        lines.append(f"| `{r}` | " + " | ".join(str(STATS.outcomes[c][r]) for c in cols) + f" | {v} |")
    never = sorted(wire.REASONS - set(reasons) - {"internal", "no_base"})
    lines += ["", f"Reasons never produced by these inputs: {', '.join(f'`{r}`' for r in never) or 'none'} "
              "(`internal` must never occur; `no_base` is raised by PublicCopy.apply, not by decode)."]
    if STATS.crashes:
        lines += ["", "## Crashes", ""]
        for c in STATS.crashes[:50]:
            lines += [f"- {c['strategy']}, max_payload_bytes={c['max_payload_bytes']}: `{c['error'].splitlines()[0]}`",
                      f"  input: `{c['input']}`"]
    (RESULTS / "fuzz_wire.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    items = reasons.most_common()[::-1]
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("cases rejected (log scale)")
    ax.set_title(f"wire.decode: {total} fuzz cases, {acc} accepted, {crashes} crashes", fontsize=10)
    for y, (_, v) in enumerate(items):
        ax.text(v, y, f" {v}", va="center", fontsize=7)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(RESULTS / "fuzz_wire.png")
    plt.close(fig)
    return total, crashes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000, help="total cases, split between the strategies (default 10000)")
    args = ap.parse_args()
    if args.cases < 1:
        ap.error("--cases must be >= 1")
    plan = allocate(args.cases)
    t0 = time.perf_counter()
    for name, n in plan.items():
        if n == 0:
            continue
        ts = time.perf_counter()
        try:
            run_strategy(name, n)
        except Exception as e:  # a hypothesis-level failure (the oracle itself never raises)
            STATS.crashes.append({"strategy": name, "error": f"hypothesis run failed: {type(e).__name__}: {e}",
                                  "input": "", "max_payload_bytes": None})
        o = STATS.outcomes[name]
        print(f"{name:16s} {STATS.cases[name]:6d} cases  {o['accepted']:5d} accepted  {o['crash']:3d} crashes  "
              f"{time.perf_counter() - ts:6.1f} s", flush=True)
    wall = time.perf_counter() - t0
    total, crashes = write_report(args, plan, wall)
    for c in STATS.crashes[:10]:
        print(f"CRASH [{c['strategy']}] {c['error']}\n  input: {c['input']}", file=sys.stderr)
    print(f"wrote {RESULTS / 'fuzz_wire.md'} and {RESULTS / 'fuzz_wire.png'} ({wall:.1f} s)")
    print(f"{total} cases, {crashes} crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
