"""The wire protocol (PROTOCOL.md; its version is VERSION): message schema, encode/decode and validation.

Pure module: no sockets, no threads, nothing of the project's networking (see DESIGN.md §5–6). The payload codecs
are in codecs.py, the error in wire_error.py (both re-exported here), and what a peer puts in a block message,
whole blocks or deltas against a public copy, in public_copy.py.

A message is a list of frames::

    frame 0      msgpack header (a map, at most MAX_HEADER_BYTES)
    frame 1..n   one raw little-endian payload per tensor, in the header's ``tensors`` order

Header keys (all required, no others): ``v`` (== VERSION), ``kind`` ("hello" | "block" | "bye" |
"resync"), ``src``, ``inc``, ``round``, ``block``, ``step`` (ints in [0, 2**63)), ``codec``
("raw" | "bf16" | "fp16" | "int8"), ``full`` (bool), ``tensors`` (list of maps ``{name, dtype,
shape, nbytes}`` plus exactly the codec's extra fields, e.g. ``scale`` for int8), ``stats`` (map
str -> finite number). Only ``block`` messages may carry tensors. A ``hello`` may also carry ``cfg``, the
sender's configuration fingerprint (map str -> str, at most MAX_CFG_ENTRIES entries; see fingerprint.py).

Sending (public_copy.py's ``encode_whole`` does this from a snapshot, so that training may go on meanwhile)::

    frames = encode(Message("block", src=me, codec="raw", full=True, tensors=snapshot_of_theta_half))
    sock.send_multipart(frames, copy=False)

Receiving::

    try:
        msg = decode(sock.recv_multipart(copy=False), max_payload_bytes=limit)
        check_names(msg, expected_names, expected_shapes)
    except WireError as e:
        metrics[e.reason] += 1                          # drop, count, log; never crash

Zero-copy: ``encode`` returns payload frames as memoryviews over the (contiguous) wire tensors.
For ``raw`` float32 that is the message tensor itself, so the caller must not modify a tensor
handed to ``encode`` until zmq is done with it (MessageTracker; public_copy.py's ``snapshot`` and
``PublicCopy.outgoing`` return fresh tensors for that).
``decode`` is zero-copy too: a payload in a writable frame whose address suits its dtype (every zmq
frame of a large message) comes back as a tensor viewing that frame, which the tensor keeps alive; other
payloads (bytes, a small misaligned frame) are copied once. The codec's decode is a no-op for float32 wire
data, so raw float32 tensors returned by ``decode`` may alias the received frames: treat them as read-only
(``PublicCopy.apply`` copies or adds them, never keeps them). Measured: the copy cost as much as the
transfer for 64-256 MiB blocks (benchmarks/results/wire_throughput.md).
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import torch

from .codecs import (CODECS, DTYPE_NAMES, DTYPES, TENSOR_KEYS, Bf16Codec, Codec, Fp16Codec, Int8Codec, RawCodec,
                     all_finite, as_cpu_float, get_codec, register_codec)
from .wire_error import REASONS, WireError, short as _short

if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 are little-endian
    raise ImportError("deca_p2p.wire: protocol payloads are little-endian; big-endian hosts are unsupported")

__all__ = [
    "VERSION",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "MAX_NAME_LEN",
    "MAX_NDIM",
    "MAX_STATS",
    "MAX_CFG_ENTRIES",
    "KINDS",
    "DTYPES",
    "REASONS",
    "WireError",
    "Message",
    "Codec",
    "RawCodec",
    "Bf16Codec",
    "Fp16Codec",
    "Int8Codec",
    "CODECS",
    "get_codec",
    "register_codec",
    "encode",
    "encode_with_roundtrip",
    "decode",
    "check_names",
]

VERSION = 3  # PROTOCOL.md; v2: raw blocks could be deltas; v1: another block order and fingerprint hashes (§15)
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 4096  # tensors per message (a decoder layer has ~10–20)
MAX_NAME_LEN = 512  # characters in a tensor name
MAX_NDIM = 32
MAX_DIM = 2**40  # any single dimension
MAX_ELEMS = 2**48  # product of max(dim, 1): bounds shapes of empty tensors too
MAX_STATS = 256
MAX_STAT_KEY_LEN = 128
MAX_INT = 2**63 - 1  # src/inc/round/block/step fit in int64
MAX_CFG_ENTRIES = 64  # hello ``cfg``: entries, key length, value length (64 * (64 + 256) B stays far below the header limit)
MAX_CFG_KEY_LEN = 64
MAX_CFG_VALUE_LEN = 256

KINDS = ("hello", "block", "bye", "resync")

_HEADER_KEYS = frozenset({"v", "kind", "src", "inc", "round", "block", "step", "codec", "full", "tensors", "stats"})
_HELLO_KEYS = _HEADER_KEYS | {"cfg"}  # a hello may carry the sender's configuration fingerprint
_INT_KEYS = ("src", "inc", "round", "block", "step")


@dataclass
class Message:
    """One protocol message. On receive, ``tensors`` holds decoded float32 values; on send, the
    float tensors to encode (float32/float16/bfloat16/float64, any device, any layout)."""

    kind: str
    src: int
    inc: int = 0
    round: int = 0
    block: int = 0
    step: int = 0
    codec: str = "raw"
    full: bool = False
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    cfg: dict[str, str] | None = None  # hello only: the sender's configuration fingerprint (None: not sent)


# ---------------------------------------------------------------------------------- header validation


@dataclass
class _Spec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    meta: dict


def _check_name(name: Any) -> str:
    if type(name) is not str:
        raise WireError("names", f"tensor name must be a str, got {type(name).__name__}")
    if not 0 < len(name) <= MAX_NAME_LEN:
        raise WireError("names", f"tensor name length {len(name)} not in 1..{MAX_NAME_LEN}")
    return name


def _parse_spec(entry: Any, i: int, codec: Codec) -> _Spec:
    if type(entry) is not dict:
        raise WireError("schema", f"tensors[{i}] must be a map, got {type(entry).__name__}")
    want = TENSOR_KEYS | set(codec.meta_keys)
    keys = set(entry)
    if keys != want:
        missing, extra = sorted(map(str, want - keys)), sorted(map(_short, keys - want))
        raise WireError("schema", f"tensors[{i}] keys: missing {missing}, unexpected {extra}")
    name = _check_name(entry["name"])
    dname = entry["dtype"]
    if type(dname) is not str or dname not in DTYPES:
        raise WireError("dtype", f"tensor {name!r}: dtype {_short(dname)} not allowed; allowed: {sorted(DTYPES)}")
    if dname not in codec.wire_dtypes:
        raise WireError("dtype", f"tensor {name!r}: codec {codec.name!r} does not send {dname}")
    shape = entry["shape"]
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise WireError("shape", f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} ints")
    numel, bound = 1, 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            raise WireError("shape", f"tensor {name!r}: bad dimension {_short(d)} in shape")
        numel *= d
        bound *= max(d, 1)
    if bound > MAX_ELEMS:
        raise WireError("shape", f"tensor {name!r}: shape too large")
    nbytes = entry["nbytes"]
    if type(nbytes) is not int or nbytes < 0:
        raise WireError("nbytes", f"tensor {name!r}: nbytes must be an int >= 0, got {_short(nbytes)}")
    dtype = DTYPES[dname]
    if numel * dtype.itemsize != nbytes:
        raise WireError("nbytes", f"tensor {name!r}: shape {shape} x {dname} is {numel * dtype.itemsize} bytes, header says {nbytes}")
    meta = {k: entry[k] for k in codec.meta_keys}
    codec.check_meta(meta)
    return _Spec(name, dtype, tuple(shape), nbytes, meta)


def _parse_cfg(cfg: Any) -> dict[str, str]:
    """A hello's configuration fingerprint: a map of at most MAX_CFG_ENTRIES str (1..MAX_CFG_KEY_LEN chars) ->
    str (at most MAX_CFG_VALUE_LEN chars)."""
    if type(cfg) is not dict or len(cfg) > MAX_CFG_ENTRIES:
        raise WireError("schema", f"'cfg' must be a map of at most {MAX_CFG_ENTRIES} entries")
    for k, v in cfg.items():
        if type(k) is not str or not 0 < len(k) <= MAX_CFG_KEY_LEN:
            raise WireError("schema", f"cfg key {_short(k)} must be a str of 1..{MAX_CFG_KEY_LEN} chars")
        if type(v) is not str or len(v) > MAX_CFG_VALUE_LEN:
            raise WireError("schema", f"cfg[{k!r}] must be a str of at most {MAX_CFG_VALUE_LEN} chars")
    return dict(cfg)


def _parse_header(h: Any) -> tuple[dict, list[_Spec], Codec]:
    """Validate a header map; return (scalar fields, tensor specs, codec)."""
    if type(h) is not dict:
        raise WireError("schema", f"header must be a map, got {type(h).__name__}")
    if "v" not in h:
        raise WireError("schema", "header has no 'v'")
    v = h["v"]
    if type(v) is not int:
        raise WireError("schema", f"'v' must be an int, got {type(v).__name__}")
    if v != VERSION:
        raise WireError("version", f"protocol version {_short(v)}, expected {VERSION}")
    keys = set(h)
    if keys != _HEADER_KEYS and keys != _HELLO_KEYS:
        missing, extra = sorted(map(str, _HEADER_KEYS - keys)), sorted(map(_short, keys - _HELLO_KEYS))
        raise WireError("schema", f"header keys: missing {missing}, unexpected {extra[:5]}")
    kind = h["kind"]
    if type(kind) is not str:
        raise WireError("schema", f"'kind' must be a str, got {type(kind).__name__}")
    if kind not in KINDS:
        raise WireError("kind", f"unknown kind {_short(kind)}")
    fields: dict[str, Any] = {"kind": kind}
    if "cfg" in h:
        if kind != "hello":
            raise WireError("schema", f"only a hello carries 'cfg', not a {kind!r}")
        fields["cfg"] = _parse_cfg(h["cfg"])
    for k in _INT_KEYS:
        x = h[k]
        if type(x) is not int or not 0 <= x <= MAX_INT:
            raise WireError("schema", f"{k!r} must be an int in [0, 2**63), got {_short(x)}")
        fields[k] = x
    codec = get_codec(h["codec"])
    fields["codec"] = codec.name
    full = h["full"]
    if type(full) is not bool:
        raise WireError("schema", f"'full' must be a bool, got {type(full).__name__}")
    fields["full"] = full
    stats = h["stats"]
    if type(stats) is not dict or len(stats) > MAX_STATS:
        raise WireError("schema", f"'stats' must be a map of at most {MAX_STATS} entries")
    out_stats = {}
    for sk, sv in stats.items():
        if type(sk) is not str or not 0 < len(sk) <= MAX_STAT_KEY_LEN:
            raise WireError("schema", f"stats key {_short(sk)} must be a str of 1..{MAX_STAT_KEY_LEN} chars")
        if type(sv) not in (int, float):
            raise WireError("schema", f"stats[{sk!r}] must be a number, got {type(sv).__name__}")
        fv = float(sv)  # msgpack ints are < 2**64: always representable
        if not math.isfinite(fv):
            raise WireError("non_finite", f"stats[{sk!r}] is {fv!r}")
        out_stats[sk] = fv
    fields["stats"] = out_stats
    tensors = h["tensors"]
    if type(tensors) is not list or len(tensors) > MAX_TENSORS:
        raise WireError("schema", f"'tensors' must be a list of at most {MAX_TENSORS} maps")
    if tensors and kind != "block":
        raise WireError("schema", f"a {kind!r} message carries no tensors, got {len(tensors)}")
    specs, seen = [], set()
    for i, entry in enumerate(tensors):
        spec = _parse_spec(entry, i, codec)
        if spec.name in seen:
            raise WireError("names", f"duplicate tensor name {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return fields, specs, codec


# ------------------------------------------------------------------------------------- encode / decode


def _int_field(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise WireError("schema", f"Message.{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if not 0 <= x <= MAX_INT:
        raise WireError("schema", f"Message.{name} must be in [0, 2**63), got {x}")
    return x


def _stat_value(k: Any, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)):
        raise WireError("schema", f"stats[{_short(k)}] must be a real number, got {type(x).__name__}")
    try:
        f = float(x)
    except Exception as e:  # e.g. a tensor with more than one element
        raise WireError("schema", f"stats[{_short(k)}]: {e}") from None
    if not math.isfinite(f):
        raise WireError("non_finite", f"stats[{_short(k)}] is {f!r}")
    return f


def _payload_view(wire: torch.Tensor) -> memoryview:
    """Zero-copy flat byte view of a contiguous CPU tensor; keeps the tensor alive."""
    if wire.numel() == 0:  # empty tensors may carry odd strides that .view(uint8) refuses
        return memoryview(b"")
    return memoryview(wire.reshape(-1).view(torch.uint8).numpy())


def _encode(msg: Message, roundtrip: bool, check_finite: bool):
    if not isinstance(msg, Message):
        raise WireError("schema", f"expected a Message, got {type(msg).__name__}")
    codec = get_codec(msg.codec)
    if not isinstance(msg.tensors, Mapping) or not isinstance(msg.stats, Mapping):
        raise WireError("schema", "Message.tensors and Message.stats must be mappings")
    entries, payloads, decoded = [], [], {}
    for name, t in msg.tensors.items():
        _check_name(name)
        t = as_cpu_float(t)
        if check_finite and not all_finite(t):
            raise WireError("non_finite", f"tensor {name!r} contains NaN/Inf")
        wire, meta = codec.encode(t)
        if wire.shape != t.shape or wire.dtype not in DTYPE_NAMES or not wire.is_contiguous():
            raise WireError("internal", f"codec {codec.name!r} returned a bad wire tensor for {name!r}")
        entry = {
            "name": name,
            "dtype": DTYPE_NAMES[wire.dtype],
            "shape": list(wire.shape),
            "nbytes": wire.numel() * wire.element_size(),
        }
        entry.update(meta)
        entries.append(entry)
        payloads.append(_payload_view(wire))
        if roundtrip:
            decoded[name] = codec.decode(wire, meta)
    header = {
        "v": VERSION,
        "kind": msg.kind,
        "src": _int_field("src", msg.src),
        "inc": _int_field("inc", msg.inc),
        "round": _int_field("round", msg.round),
        "block": _int_field("block", msg.block),
        "step": _int_field("step", msg.step),
        "codec": codec.name,
        "full": bool(msg.full) if isinstance(msg.full, (bool, np.bool_)) else msg.full,
        "tensors": entries,
        "stats": {k: _stat_value(k, x) for k, x in msg.stats.items()},
    }
    if msg.cfg is not None:
        if not isinstance(msg.cfg, Mapping):
            raise WireError("schema", "Message.cfg must be a mapping or None")
        header["cfg"] = dict(msg.cfg)
    _parse_header(header)  # whatever encode emits, decode's validation accepts
    blob = msgpack.packb(header, use_bin_type=True)
    if len(blob) > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header is {len(blob)} bytes, limit {MAX_HEADER_BYTES}")
    return [blob, *payloads], decoded


def encode(msg: Message, *, check_finite: bool = True) -> list:
    """Frames ``[header: bytes, payload: memoryview, ...]`` for ``msg``.

    Payloads are zero-copy views of the codec's contiguous wire tensors; where the codec passes a
    tensor through (raw float32/float16/bfloat16, bf16 of bfloat16, fp16 of float16) that is the
    message's own tensor's memory: keep it unmodified until zmq has sent it. Raises WireError for
    an invalid message; with ``check_finite`` (default) also for NaN/Inf values, which every
    receiver would reject anyway. Narrowing casts (fp16/bf16/float64->float32) saturate.
    """
    return _encode(msg, roundtrip=False, check_finite=check_finite)[0]


def encode_with_roundtrip(msg: Message, *, check_finite: bool = True) -> tuple[list, dict[str, torch.Tensor]]:
    """``encode(msg)`` plus the float32 tensors every receiver will decode, bit-identical.

    The returned tensors may share memory with the payload frames (raw float32): read them, don't
    modify them (``PublicCopy.apply`` copies/adds, never stores them by reference).
    """
    return _encode(msg, roundtrip=True, check_finite=check_finite)


def _frame_view(f: Any) -> memoryview:
    buf = getattr(f, "buffer", f)  # zmq.Frame -> its memoryview
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _payload_tensor(mv: memoryview, spec: _Spec) -> torch.Tensor:
    """The payload as a tensor of the spec's dtype and shape: a view of the frame when it is writable and
    aligned for the dtype (no copy; the tensor keeps the frame alive), else one copy into a fresh tensor
    (read-only buffers such as bytes, which torch.frombuffer would only warn about, or misaligned ones)."""
    if spec.nbytes and not mv.readonly:
        view = torch.frombuffer(mv, dtype=torch.uint8)
        if view.data_ptr() % spec.dtype.itemsize == 0:
            return view.view(spec.dtype).reshape(spec.shape)
    raw = torch.empty(spec.nbytes, dtype=torch.uint8)
    if spec.nbytes:
        np.copyto(raw.numpy(), np.frombuffer(mv, dtype=np.uint8))
    return raw.view(spec.dtype).reshape(spec.shape)


def _decode(frames: Any, max_payload_bytes: int | None) -> Message:
    if isinstance(frames, (bytes, bytearray, memoryview, str)):
        raise WireError("frames", f"frames must be a list of buffers, got a single {type(frames).__name__}")
    try:
        frames = list(frames)
    except TypeError:
        raise WireError("frames", f"frames must be a list of buffers, got {type(frames).__name__}") from None
    n = len(frames)
    if n == 0:
        raise WireError("frames", "no frames")
    if n > MAX_TENSORS + 1:
        raise WireError("frames", f"{n} frames, at most {MAX_TENSORS + 1}")
    views = []
    for i, f in enumerate(frames):
        try:
            views.append(_frame_view(f))
        except (TypeError, ValueError, BufferError) as e:
            raise WireError("frames", f"frame {i} is not a byte buffer ({type(f).__name__}): {e}") from None
    hv = views[0]
    if hv.nbytes > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header is {hv.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    payload_total = sum(v.nbytes for v in views[1:])
    if max_payload_bytes is not None and payload_total > max_payload_bytes:
        raise WireError("payload_size", f"payload is {payload_total} bytes, limit {max_payload_bytes}")
    try:
        header = msgpack.unpackb(
            hv,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=MAX_HEADER_BYTES,
            max_array_len=MAX_TENSORS,
            max_map_len=MAX_STATS,
            max_ext_len=0,
        )
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError, ...
        raise WireError("msgpack", f"header is not valid msgpack: {type(e).__name__}: {_short(str(e), 100)}") from None
    fields, specs, codec = _parse_header(header)
    if len(specs) != n - 1:
        raise WireError("frames", f"header lists {len(specs)} tensors but {n - 1} payload frames came")
    tensors: dict[str, torch.Tensor] = {}
    for spec, mv in zip(specs, views[1:]):
        if mv.nbytes != spec.nbytes:
            raise WireError("nbytes", f"tensor {spec.name!r}: frame is {mv.nbytes} bytes, header says {spec.nbytes}")
    for spec, mv in zip(specs, views[1:]):
        x = codec.decode(_payload_tensor(mv, spec), spec.meta)
        if x.dtype != torch.float32 or tuple(x.shape) != spec.shape:
            raise WireError("internal", f"codec {codec.name!r} decoded {spec.name!r} to {x.dtype} {tuple(x.shape)}")
        if not all_finite(x):
            raise WireError("non_finite", f"tensor {spec.name!r} contains NaN/Inf")
        tensors[spec.name] = x
    return Message(tensors=tensors, **fields)


def decode(frames: Sequence, *, max_payload_bytes: int | None = None) -> Message:
    """Validate and decode an untrusted frame list (bytes / bytearray / memoryview / zmq.Frame).

    Returns a Message whose tensors are float32 (codec-decoded), in header order; raw float32 ones may view
    the frames (zero-copy), so do not write into them.
    Raises only WireError, whatever the input (a bug surfacing here has reason "internal").
    """
    try:
        return _decode(frames, max_payload_bytes)
    except WireError:
        raise
    except Exception as e:  # last line of defence: the peer must never crash on input
        raise WireError("internal", f"{type(e).__name__}: {_short(str(e), 100)}") from e


def check_names(msg: Message, expected: Sequence[str], shapes: Sequence[tuple] | Mapping[str, tuple] | None = None) -> None:
    """Raise WireError unless ``msg.tensors`` has exactly the names in ``expected`` (reason "names")
    and, when ``shapes`` is given (aligned with ``expected``, or a name -> shape map), those shapes
    (reason "shape")."""
    got, want = list(msg.tensors), list(expected)
    if len(set(want)) != len(want):
        raise ValueError("check_names: duplicate expected names")
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise WireError("names", f"tensor names differ: missing {_short(missing, 120)}, unexpected {_short(extra, 120)}")
    if shapes is None:
        return
    if not isinstance(shapes, Mapping):
        shapes = list(shapes)
        if len(shapes) != len(want):
            raise ValueError("check_names: shapes must align with expected")
        shapes = dict(zip(want, shapes))
    for name in want:
        s = tuple(msg.tensors[name].shape)
        if s != tuple(shapes[name]):
            raise WireError("shape", f"tensor {name!r} has shape {s}, expected {tuple(shapes[name])}")

