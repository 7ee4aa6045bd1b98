"""The wire protocol (PROTOCOL.md; its version is VERSION): message schema, encode/decode/validation and payload codecs.

Pure module: no sockets, no threads, nothing of the project's networking (see DESIGN.md §5–6).

A message is a list of frames::

    frame 0      msgpack header (a map, at most MAX_HEADER_BYTES)
    frame 1..n   one raw little-endian payload per tensor, in the header's ``tensors`` order

Header keys (all required, no others): ``v`` (== VERSION), ``kind`` ("hello" | "block" | "bye" |
"resync"), ``src``, ``inc``, ``round``, ``block``, ``step`` (ints in [0, 2**63)), ``codec``
("raw" | "bf16" | "fp16" | "int8"), ``full`` (bool), ``tensors`` (list of maps ``{name, dtype,
shape, nbytes}`` plus exactly the codec's extra fields, e.g. ``scale`` for int8), ``stats`` (map
str -> finite number). Only ``block`` messages may carry tensors. A ``hello`` may also carry ``cfg``, the
sender's configuration fingerprint (map str -> str, at most MAX_CFG_ENTRIES entries; see fingerprint.py).

Sending::

    pc = PublicCopy()                                   # one per active block
    frames = pc.encode_block(theta_half, src=me, codec="int8", full=first_of_activation, ...)
    sock.send_multipart(frames, copy=False)             # pc has already advanced, exactly as receivers will

or, step by step::

    msg = Message("block", src=me, codec=c, full=f, tensors=pc.outgoing(theta_half, c, f))
    frames, decoded = encode_with_roundtrip(msg)
    pc.apply(decoded, f)

Receiving::

    try:
        msg = decode(sock.recv_multipart(copy=False), max_payload_bytes=limit)
        check_names(msg, expected_names, expected_shapes)
        their_copy[msg.src].apply(msg.tensors, msg.full)
    except WireError as e:
        metrics[e.reason] += 1                          # drop, count, log; never crash

Zero-copy: ``encode`` returns payload frames as memoryviews over the (contiguous) wire tensors.
For ``raw`` float32 that is the message tensor itself, so the caller must not modify a tensor
handed to ``encode`` until zmq is done with it (MessageTracker). ``PublicCopy.outgoing`` always
returns freshly allocated tensors, so nothing it returns is ever mutated later by this module.
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
    "PublicCopy",
    "snapshot",
    "encode_whole",
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

# Allow-list of wire dtypes (name on the wire -> torch dtype). float64 is deliberately absent:
# the raw codec sends float64 sources as float32.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_SOURCE_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Every reason slug WireError may carry (stable; meant for metrics counters).
REASONS = frozenset(
    {
        "frames",  # not a frame list, no frames, a frame that is not a buffer, wrong number of payload frames
        "header_size",  # header frame over MAX_HEADER_BYTES
        "msgpack",  # header is not exactly one valid msgpack object
        "schema",  # header/tensor map structure: not a map, missing/extra key, wrongly typed field, tensors on non-block
        "version",  # v != VERSION
        "kind",  # unknown kind
        "codec",  # unknown codec, invalid codec field (e.g. negative scale)
        "dtype",  # dtype not on the allow-list or not produced by the message's codec
        "shape",  # shape malformed (not a list of ints in range), or differs from what check_names expects
        "nbytes",  # nbytes malformed, != prod(shape)*itemsize, or != payload frame length
        "payload_size",  # total payload over max_payload_bytes
        "non_finite",  # NaN/Inf in stats, in a codec field, or in decoded values
        "names",  # bad/duplicate tensor name, or names differ from those expected
        "no_base",  # a delta arrived but there is no public copy to apply it to (ask for a resync)
        "internal",  # a bug in this module surfaced while decoding (should never happen; tests check)
    }
)

_HEADER_KEYS = frozenset({"v", "kind", "src", "inc", "round", "block", "step", "codec", "full", "tensors", "stats"})
_HELLO_KEYS = _HEADER_KEYS | {"cfg"}  # a hello may carry the sender's configuration fingerprint
_INT_KEYS = ("src", "inc", "round", "block", "step")
_TENSOR_KEYS = frozenset({"name", "dtype", "shape", "nbytes"})


class WireError(ValueError):
    """A message (or message-to-be) violates the protocol (PROTOCOL.md).

    ``reason`` is a short stable slug from REASONS, for metrics; ``str(err)`` is a one-line message.
    """

    def __init__(self, reason: str, message: str | None = None):
        self.reason = reason
        self.message = " ".join((message or reason).split())  # one line
        super().__init__(reason, self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self):
        return (type(self), (self.reason, self.message))


def _short(x: Any, n: int = 60) -> str:
    try:
        r = repr(x)
    except Exception:  # pragma: no cover - defensive
        r = f"<{type(x).__name__}>"
    return r if len(r) <= n else r[: n - 3] + "..."


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


# --------------------------------------------------------------------------------------------- codecs


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN/Inf.

    Fast path: a finite float32/64 sum proves every element finite (any NaN or Inf makes the sum non-finite);
    it runs at memory speed, where isfinite().all() measured 0.3-0.7 GB/s. When the sum is not finite (an overflow
    of large finite values, or a real NaN/Inf) or for half types, one exact aminmax pass decides: NaN propagates
    through min/max and an infinity shows up as one of them.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.is_complex():
        return _all_finite(torch.view_as_real(t))
    flat = t.reshape(-1)
    if flat.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(flat.sum())):
        return True
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _as_cpu_float(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise WireError("schema", f"message tensor must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SOURCE_FLOATS:
        raise WireError("dtype", f"cannot send a {t.dtype} tensor; expected float32/float16/bfloat16/float64")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t


def _cast_clamped(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Contiguous tensor of ``dtype`` holding t; a narrowing cast saturates at ±finfo.max instead of
    overflowing to ±inf (NaN stays NaN). Returns t itself when it already is contiguous ``dtype``."""
    if t.dtype == dtype:
        return t.contiguous()
    out = torch.empty(t.shape, dtype=dtype)
    out.copy_(t)
    if torch.finfo(dtype).max < torch.finfo(t.dtype).max and out.numel():
        big = torch.finfo(dtype).max
        out.clamp_(-big, big)
    return out


class Codec:
    """One payload codec (hivemind ``compression/base.py`` style).

    ``encode(t)`` takes a float tensor (float32/float16/bfloat16/float64, already detached and on
    the CPU) and returns ``(wire, meta)``: a contiguous tensor of one of ``wire_dtypes`` with t's
    shape, and the codec's extra header fields (exactly ``meta_keys``; values must survive a
    msgpack round trip unchanged: Python int/float/str). It must not modify t.
    ``decode(wire, meta)`` returns a float32 tensor of the same shape. It may return ``wire`` itself
    when that already is float32, and it must be deterministic: the sender predicts what receivers
    decode by calling it on its own wire tensor. ``check_meta`` validates untrusted codec fields.
    """

    name: str = ""
    wire_dtypes: frozenset[str] = frozenset()
    meta_keys: tuple[str, ...] = ()
    lossless: bool = False

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def decode(self, wire: torch.Tensor, meta: dict) -> torch.Tensor:
        raise NotImplementedError

    def check_meta(self, meta: dict) -> None:
        """Raise WireError for invalid codec fields (types/values). Default: nothing to check."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class RawCodec(Codec):
    """float32 as is (zero-copy); float16/bfloat16 pass through; float64 is sent as float32."""

    name = "raw"
    wire_dtypes = frozenset({"float32", "float16", "bfloat16"})
    lossless = True  # for float32/float16/bfloat16 sources

    def encode(self, t):
        if t.dtype == torch.float64:
            return _cast_clamped(t, torch.float32), {}
        return t.contiguous(), {}

    def decode(self, wire, meta):
        return wire if wire.dtype == torch.float32 else wire.to(torch.float32)


class _CastCodec(Codec):
    dtype: torch.dtype

    def encode(self, t):
        return _cast_clamped(t, self.dtype), {}

    def decode(self, wire, meta):
        return wire.to(torch.float32)


class Bf16Codec(_CastCodec):
    """bfloat16, round-to-nearest-even; relative error <= 2**-8, saturating at ±3.39e38."""

    name = "bf16"
    dtype = torch.bfloat16
    wire_dtypes = frozenset({"bfloat16"})


class Fp16Codec(_CastCodec):
    """float16, round-to-nearest-even; relative error <= 2**-11 (absolute <= 2**-25 near zero),
    saturating at ±65504."""

    name = "fp16"
    dtype = torch.float16
    wire_dtypes = frozenset({"float16"})


class Int8Codec(Codec):
    """Symmetric per-tensor absmax: scale = absmax/127 (float32), q = clamp(round(t/scale), ±127);
    scale 0 (all-zero or empty tensor) sends all zeros. Error <= scale/2 per element."""

    name = "int8"
    wire_dtypes = frozenset({"int8"})
    meta_keys = ("scale",)

    def encode(self, t):
        x = _cast_clamped(t, torch.float32)
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.int8), {"scale": 0.0}
        lo, hi = torch.aminmax(x)
        absmax = torch.maximum(hi, -lo)
        scale = absmax / 127.0  # float32, 0-d
        if not bool(torch.isfinite(scale)):  # NaN/Inf source (encode(check_finite=False)); receivers reject it
            return torch.zeros(x.shape, dtype=torch.int8), {"scale": float(scale)}
        if not bool(torch.isfinite(scale * 127.0)):  # absmax within an ulp of float32 max: keep decode finite
            scale = torch.nextafter(scale, torch.zeros_like(scale))
        if float(scale) == 0.0:
            return torch.zeros(x.shape, dtype=torch.int8), {"scale": 0.0}
        q = torch.div(x, scale).round_().clamp_(-127, 127).to(torch.int8)
        return q, {"scale": float(scale)}  # float(float32) is exact, and exact through msgpack float64

    def decode(self, wire, meta):
        out = wire.to(torch.float32)
        out.mul_(torch.tensor(meta["scale"], dtype=torch.float32))
        return out

    def check_meta(self, meta):
        s = meta["scale"]
        if type(s) is not float:
            raise WireError("codec", f"int8 scale must be a float, got {type(s).__name__}")
        if not math.isfinite(s):
            raise WireError("non_finite", f"int8 scale is {s!r}")
        if s < 0:
            raise WireError("codec", f"int8 scale must be >= 0, got {s!r}")


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add a codec to CODECS (its wire dtypes must be on the DTYPES allow-list)."""
    if not codec.name or not isinstance(codec.name, str):
        raise ValueError("codec needs a non-empty str name")
    if not codec.wire_dtypes or not set(codec.wire_dtypes) <= set(DTYPES):
        raise ValueError(f"codec {codec.name!r}: wire dtypes must be a non-empty subset of {sorted(DTYPES)}")
    if set(codec.meta_keys) & _TENSOR_KEYS:
        raise ValueError(f"codec {codec.name!r}: meta keys clash with {sorted(_TENSOR_KEYS)}")
    CODECS[codec.name] = codec
    return codec


for _c in (RawCodec(), Bf16Codec(), Fp16Codec(), Int8Codec()):
    register_codec(_c)
del _c


def get_codec(name: Any) -> Codec:
    """The registered codec called ``name``; WireError(reason="codec") for anything else."""
    if type(name) is not str:
        raise WireError("codec", f"codec name must be a str, got {type(name).__name__}")
    try:
        return CODECS[name]
    except KeyError:
        raise WireError("codec", f"unknown codec {_short(name)}; known: {sorted(CODECS)}") from None


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
    want = _TENSOR_KEYS | set(codec.meta_keys)
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
        t = _as_cpu_float(t)
        if check_finite and not _all_finite(t):
            raise WireError("non_finite", f"tensor {name!r} contains NaN/Inf")
        wire, meta = codec.encode(t)
        if wire.shape != t.shape or wire.dtype not in _DTYPE_NAMES or not wire.is_contiguous():
            raise WireError("internal", f"codec {codec.name!r} returned a bad wire tensor for {name!r}")
        entry = {
            "name": name,
            "dtype": _DTYPE_NAMES[wire.dtype],
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
        if not _all_finite(x):
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


# -------------------------------------------------------------------------------------- public copy


class PublicCopy:
    """The sender's public copy θ̂ of its active block, kept identically by the sender and by every receiver.

    Block payloads are deltas: the sender transmits q = codec(θ½ − θ̂) and both sides apply
    θ̂ += decode(q); a ``full`` message replaces θ̂ with decode(codec(θ½)). With lossy codecs this
    is error-feedback (CHOCO-style) gossip: what the codec loses in one step is still in the next delta.

    ``tensors`` (float32, owned here, never sent zero-copy, None until the first full message) is
    updated in place by deltas; treat it as read-only outside this class.

    Sender: ``encode_block(current, ...)`` does it all, or ``outgoing`` -> ``encode_with_roundtrip``
    -> ``apply(decoded, full)``. Receiver: ``apply(decode(frames).tensors, full)``. Because the
    sender applies exactly the tensors receivers decode, the copies stay bit-identical.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget θ̂ (new activation, restart): the next message must be ``full``."""
        self.tensors = None

    def outgoing(self, current: Mapping[str, torch.Tensor], codec: str, full: bool) -> dict[str, torch.Tensor]:
        """The float32 tensors to put in a block Message: ``current`` (full) or ``current − θ̂`` (delta).

        Always freshly allocated (never aliasing ``current`` or θ̂), so they can go out zero-copy
        while the caller keeps updating its parameters. Does not change θ̂; call ``apply`` with what
        ``encode_with_roundtrip`` returns. Raises ValueError for a delta without θ̂ or with names /
        shapes that differ from θ̂.
        """
        get_codec(codec)
        if full:
            return snapshot(current)
        if self.tensors is None:
            raise ValueError("PublicCopy: no public copy yet; the first message must be full")
        if set(current) != set(self.tensors):
            raise ValueError(f"PublicCopy: names {sorted(current)} differ from the public copy's {sorted(self.tensors)}")
        out = {}
        for k, v in current.items():
            v = _as_cpu_float(v)
            base = self.tensors[k]
            if v.shape != base.shape:
                raise ValueError(f"PublicCopy: {k!r} has shape {tuple(v.shape)}, public copy {tuple(base.shape)}")
            d = torch.sub(v, base)  # fresh; float32 (float64 sources are narrowed below)
            out[k] = d if d.dtype == torch.float32 else d.to(torch.float32)
        return out

    def apply(self, decoded: Mapping[str, torch.Tensor], full: bool) -> None:
        """Advance θ̂ by decoded values: replace (full, copying) or add in place (delta).

        Validates everything before changing anything. WireError "no_base" for a delta without θ̂
        (ask for a resync), "names"/"shape" when the delta does not match θ̂.
        """
        if full:
            self.tensors = {k: _fresh_f32(v) for k, v in decoded.items()}
            return
        if self.tensors is None:
            raise WireError("no_base", "delta received but there is no public copy (needs a full message)")
        if set(decoded) != set(self.tensors):
            raise WireError("names", f"delta names {_short(sorted(decoded), 120)} differ from the public copy's")
        for k, v in decoded.items():
            if v.shape != self.tensors[k].shape:
                raise WireError("shape", f"delta {k!r} has shape {tuple(v.shape)}, public copy {tuple(self.tensors[k].shape)}")
        for k, v in decoded.items():
            self.tensors[k].add_(v)

    def encode_block(
        self,
        current: Mapping[str, torch.Tensor],
        *,
        src: int,
        codec: str = "raw",
        full: bool = False,
        inc: int = 0,
        round: int = 0,
        block: int = 0,
        step: int = 0,
        stats: Mapping[str, float] | None = None,
        check_finite: bool = True,
    ) -> list:
        """Build, encode and account one block message: returns its frames (send them zero-copy).

        θ̂ advances by exactly what receivers will decode; on any error θ̂ is unchanged. ``check_finite``:
        see ``encode`` (a peer passes False: receivers validate anyway, and it watches its loss itself).
        """
        msg = Message(
            kind="block", src=src, inc=inc, round=round, block=block, step=step, codec=codec, full=full,
            tensors=self.outgoing(current, codec, full), stats=dict(stats or {}),
        )
        frames, decoded = encode_with_roundtrip(msg, check_finite=check_finite)
        self.apply(decoded, full)
        return frames


def encode_whole(current: Mapping[str, torch.Tensor], *, codec: str = "raw", check_finite: bool = True,
                 owned: bool = False, **fields) -> list:
    """Frames of a block message carrying θ½ itself, whole (a lossless codec: PROTOCOL.md §8.1), taken as a snapshot
    so it can go out zero-copy while the caller trains on (owned=True: `current` is such a snapshot already, the
    caller's to give away). ``fields``: src, inc, round, block, step, stats."""
    if not get_codec(codec).lossless:
        raise ValueError(f"encode_whole: codec {codec!r} is lossy; its blocks go as deltas (PublicCopy.encode_block)")
    return encode(Message(kind="block", codec=codec, full=True, tensors=dict(current) if owned else snapshot(current),
                          **fields), check_finite=check_finite)


def snapshot(current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh float32 copies of a block, to send zero-copy while the caller goes on changing its parameters."""
    return {k: _fresh_f32(_as_cpu_float(v)) for k, v in current.items()}


def _fresh_f32(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t)
    return out
