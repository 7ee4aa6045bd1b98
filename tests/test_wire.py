"""Tests for deca_p2p.wire: round trips, PublicCopy, validation rules, and a quick fuzz."""

from __future__ import annotations

import gc
import math
import os
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deca_p2p import wire
from deca_p2p.wire import (
    CODECS,
    DTYPES,
    MAX_HEADER_BYTES,
    REASONS,
    Codec,
    Message,
    WireError,
    check_names,
    decode,
    encode,
    encode_with_roundtrip,
    get_codec,
)
from deca_p2p.public_copy import PublicCopy

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
SRC_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def as_bytes(frames) -> list[bytes]:
    """What a receiver gets off the network (read-only buffers, no shared memory)."""
    return [bytes(f) for f in frames]


def expect(reason: str, frames, **kw) -> WireError:
    with pytest.raises(WireError) as ei:
        decode(frames, **kw)
    assert ei.value.reason == reason, str(ei.value)
    assert "\n" not in str(ei.value)
    return ei.value


# --------------------------------------------------------------------------------------- strategies

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
# |x| <= 6e4 so fp16 never saturates; subnormals of every format included.
values = st.floats(min_value=-6e4, max_value=6e4, width=32, allow_nan=False, allow_infinity=False)
stat_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.integers(min_value=-(2**53), max_value=2**53)
)
stats_st = st.dictionaries(st.text(min_size=1, max_size=20), stat_values, max_size=6)
u63 = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def tensors_st(draw, dtype=None):
    dtype = dtype if dtype is not None else draw(st.sampled_from(SRC_DTYPES))
    arr = draw(hnp.arrays(np.float32, draw(shapes), elements=values))
    t = torch.from_numpy(arr.copy()).to(dtype)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous input must be sent in logical order
    return t


def error_bound(codec: str, src: torch.Tensor, wire_dtype: torch.dtype) -> torch.Tensor:
    """Per-element |decoded - src| bound for a source tensor (no saturation: |src| <= 6e4)."""
    x = src.float().abs()
    if codec == "raw":
        return torch.zeros_like(x)
    if codec == "bf16":
        return x * 2.0**-8 + 2.0**-134
    if codec == "fp16":
        return x * 2.0**-11 + 2.0**-25
    absmax = float(x.max()) if x.numel() else 0.0
    scale = absmax / 127
    return torch.full_like(x, 0.5 * scale * (1 + 1e-5) + absmax * 2.0**-22 + 1e-37)


# --------------------------------------------------------------------------------------- round trips


@SETTINGS
@given(
    codec=st.sampled_from(sorted(CODECS)),
    data=st.data(),
    src=u63,
    inc=u63,
    rnd=u63,
    block=u63,
    step=u63,
    full=st.booleans(),
    stats=stats_st,
)
def test_block_roundtrip(codec, data, src, inc, rnd, block, step, full, stats):
    n = data.draw(st.integers(0, 3))
    tensors = {f"layer.{i}.w": data.draw(tensors_st()) for i in range(n)}
    msg = Message("block", src=src, inc=inc, round=rnd, block=block, step=step, codec=codec, full=full,
                  tensors=tensors, stats=stats)
    frames, predicted = encode_with_roundtrip(msg)
    assert len(frames) == 1 + n
    out = decode(as_bytes(frames))
    assert (out.kind, out.src, out.inc, out.round, out.block, out.step, out.codec, out.full) == (
        "block", src, inc, rnd, block, step, codec, full)
    assert out.stats == {k: float(v) for k, v in stats.items()}
    assert all(type(v) is float for v in out.stats.values())
    assert list(out.tensors) == list(tensors)
    for name, t in tensors.items():
        got = out.tensors[name]
        assert got.dtype == torch.float32 and got.shape == t.shape and got.is_contiguous()
        assert bit_equal(got, predicted[name].float())  # sender predicts the receiver exactly
        ref = t.float()
        if codec == "raw" or (codec == "bf16" and t.dtype == torch.bfloat16) or (
                codec == "fp16" and t.dtype == torch.float16):
            assert bit_equal(got, ref)  # lossless: raw float32 bit-exact, half types pass through
        else:
            assert bool(((got - ref).abs() <= error_bound(codec, t, got.dtype)).all())


@SETTINGS
@given(kind=st.sampled_from(["hello", "bye", "resync"]), src=u63, inc=u63, step=u63,
       codec=st.sampled_from(sorted(CODECS)), full=st.booleans(), stats=stats_st)
def test_header_only_roundtrip(kind, src, inc, step, codec, full, stats):
    frames = encode(Message(kind, src=src, inc=inc, step=step, codec=codec, full=full, stats=stats))
    assert len(frames) == 1
    out = decode(frames)
    assert out == Message(kind, src=src, inc=inc, step=step, codec=codec, full=full,
                          stats={k: float(v) for k, v in stats.items()})


def test_raw_float32_is_zero_copy_both_ways():
    t = torch.randn(64, 32)
    frames = encode(Message("block", src=1, tensors={"w": t}))
    payload = np.frombuffer(frames[1], dtype=np.uint8)
    assert payload.ctypes.data == t.data_ptr() and payload.nbytes == t.numel() * 4
    # the payload keeps the tensor alive after every other reference is gone
    del t, payload
    gc.collect()
    ref = decode(as_bytes(frames)).tensors["w"].clone()
    # a writable, aligned frame (what zmq hands over) is viewed, not copied
    ba = bytearray(frames[0]), bytearray(frames[1])
    out = decode(list(ba)).tensors["w"]
    assert out.data_ptr() == np.frombuffer(ba[1], dtype=np.uint8).ctypes.data and torch.equal(out, ref)
    ba[1][:4] = b"\x00" * 4
    assert out.reshape(-1)[0].item() == 0.0
    # read-only (bytes) and misaligned frames are copied once, into a writable tensor
    ro = decode(as_bytes(frames)).tensors["w"]
    ro.add_(0)
    shifted = bytearray(len(frames[1]) + 1)
    shifted[1:] = bytes(frames[1])
    mis = decode([bytes(frames[0]), memoryview(shifted)[1:]]).tensors["w"]
    assert torch.equal(mis, ref) and mis.data_ptr() % 4 == 0


def test_transposed_tensor_sent_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    out = decode(as_bytes(encode(Message("block", src=0, tensors={"t": t}))))
    assert torch.equal(out.tensors["t"], t)


def test_decode_read_only_buffers_emit_no_warning():
    frames = as_bytes(encode(Message("block", src=0, codec="fp16", tensors={"a": torch.randn(7)})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode(frames)
        decode([memoryview(f) for f in frames])


def test_zmq_frames_and_inproc_socket():
    zmq = pytest.importorskip("zmq")
    msg = Message("block", src=2, round=3, codec="int8", tensors={"a": torch.randn(300, 300), "b": torch.randn(3)},
                  stats={"loss": 2.5})
    frames, predicted = encode_with_roundtrip(msg)
    out = decode([zmq.Frame(bytes(f)) for f in frames])
    assert all(bit_equal(out.tensors[k], predicted[k]) for k in predicted)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        a.send_multipart(frames, copy=False)
        assert b.poll(5000)
        got = decode(b.recv_multipart(copy=False))
        assert got.stats == {"loss": 2.5} and all(bit_equal(got.tensors[k], predicted[k]) for k in predicted)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_codec_registry():
    assert set(CODECS) == {"raw", "bf16", "fp16", "int8"}
    assert set(DTYPES) >= {"float32", "float16", "bfloat16", "int8"}
    for name, c in CODECS.items():
        assert isinstance(c, Codec) and c.name == name and get_codec(name) is c
        assert c.wire_dtypes <= set(DTYPES)
    with pytest.raises(WireError) as ei:
        get_codec("zstd")
    assert ei.value.reason == "codec"


def test_saturating_casts_and_int8_edges():
    big = torch.tensor([1e5, -1e6, 3.0])
    out = decode(encode(Message("block", src=0, codec="fp16", tensors={"x": big}))).tensors["x"]
    assert out.tolist() == [65504.0, -65504.0, 3.0]
    fmax = torch.finfo(torch.float32).max
    huge = torch.tensor([fmax, -fmax, 1.0])
    for codec in ("bf16", "int8", "raw"):
        out = decode(encode(Message("block", src=0, codec=codec, tensors={"x": huge}))).tensors["x"]
        assert bool(torch.isfinite(out).all()) and out[0] > 3e38 and out[1] < -3e38
    out = decode(encode(Message("block", src=0, codec="raw", tensors={"x": torch.tensor([1e300, 0.5], dtype=torch.float64)})))
    assert out.tensors["x"].tolist() == [fmax, 0.5]
    # int8: all-zero and empty tensors (scale 0), a single value maps to ±127 exactly
    for t in (torch.zeros(5), torch.zeros(0, 3), torch.tensor(-2.5)):
        frames, pred = encode_with_roundtrip(Message("block", src=0, codec="int8", tensors={"x": t}))
        assert torch.equal(decode(frames).tensors["x"], t) and torch.equal(pred["x"], t)
    hdr = msgpack.unpackb(encode(Message("block", src=0, codec="int8", tensors={"x": torch.tensor([4.0, -2.0])}))[0])
    assert hdr["tensors"][0]["scale"] == pytest.approx(4 / 127) and hdr["tensors"][0]["dtype"] == "int8"


def test_encode_rejects_bad_messages():
    def reason(msg, **kw):
        with pytest.raises(WireError) as ei:
            encode(msg, **kw)
        return ei.value.reason

    assert reason(Message("block", src=0, tensors={"x": torch.tensor([1.0, math.nan])})) == "non_finite"
    assert reason(Message("block", src=0, codec="int8", tensors={"x": torch.tensor([math.inf])})) == "non_finite"
    assert reason(Message("block", src=0, tensors={"x": torch.ones(2, dtype=torch.int64)})) == "dtype"
    assert reason(Message("block", src=0, tensors={"x": [1.0]})) == "schema"
    assert reason(Message("block", src=0, tensors={"": torch.ones(1)})) == "names"
    assert reason(Message("block", src=0, tensors={7: torch.ones(1)})) == "names"
    assert reason(Message("hello", src=0, tensors={"x": torch.ones(1)})) == "schema"
    assert reason(Message("block", src=True)) == "schema"
    assert reason(Message("block", src=0, step=-1)) == "schema"
    assert reason(Message("block", src=0, full=1)) == "schema"
    assert reason(Message("gossip", src=0)) == "kind"
    assert reason(Message("block", src=0, codec="zstd")) == "codec"
    assert reason(Message("block", src=0, stats={"loss": math.nan})) == "non_finite"
    assert reason(Message("block", src=0, stats={"loss": "1.0"})) == "schema"
    many = {f"{i:0400d}": torch.zeros(()) for i in range(200)}
    assert reason(Message("block", src=0, tensors=many)) == "header_size"
    # check_finite=False lets NaN out, but receivers still reject it
    frames = encode(Message("block", src=0, tensors={"x": torch.tensor([math.nan])}), check_finite=False)
    expect("non_finite", frames)
    # numpy ints/floats are fine on the send side
    out = decode(encode(Message("block", src=np.int64(3), stats={"loss": np.float32(0.5), "t": torch.tensor(2.0)})))
    assert out.src == 3 and out.stats == {"loss": 0.5, "t": 2.0}


# --------------------------------------------------------------------------------------- PublicCopy


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_public_copy_stays_bit_identical(codec, src_dtype):
    g = torch.Generator().manual_seed(0)
    shapes_ = {"w": (16, 8), "b": (8,), "s": (), "e": (0, 4)}
    theta = {k: torch.randn(s, generator=g) for k, s in shapes_.items()}
    sender, receiver = PublicCopy(), PublicCopy()
    errs = []
    for step in range(12):
        full = step in (0, 7)
        cur = {k: v.to(src_dtype) for k, v in theta.items()}
        frames = sender.encode_block(cur, src=1, codec=codec, full=full, step=step, stats={"loss": 1.0 / (step + 1)})
        msg = decode(as_bytes(frames))
        check_names(msg, list(shapes_), [shapes_[k] for k in shapes_])
        assert msg.full is full
        receiver.apply(msg.tensors, msg.full)
        for k in shapes_:
            assert bit_equal(sender.tensors[k], receiver.tensors[k]), (codec, step, k)
        err = max(float((sender.tensors[k] - cur[k].float()).abs().max()) if cur[k].numel() else 0.0 for k in cur)
        if codec == "raw":
            assert err <= 1e-6
        if full and codec == "raw":
            assert all(bit_equal(sender.tensors[k], cur[k].float()) for k in cur)  # full resets exactly
        errs.append(err)
        theta = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in theta.items()}
    # error feedback: the public copy tracks the current values; the codec error does not accumulate
    bound = {"raw": 1e-6, "bf16": 0.05, "fp16": 0.01, "int8": 0.05}[codec]
    assert max(errs) <= bound, errs


def test_public_copy_full_resets_and_outgoing_is_fresh():
    pc = PublicCopy()
    cur = {"a": torch.randn(5), "b": torch.randn(2, 2)}
    with pytest.raises(ValueError):
        pc.outgoing(cur, "raw", full=False)  # no base yet
    out = pc.outgoing(cur, "raw", full=True)
    assert all(out[k].data_ptr() != cur[k].data_ptr() and torch.equal(out[k], cur[k]) for k in cur)
    frames, dec = encode_with_roundtrip(Message("block", src=0, full=True, tensors=out))
    pc.apply(dec, True)
    assert all(pc.tensors[k].data_ptr() != dec[k].data_ptr() for k in cur)  # never stores payload memory
    payload_before = [bytes(f) for f in frames[1:]]
    new = {k: v + 1 for k, v in cur.items()}
    delta = pc.outgoing(new, "raw", full=False)
    assert all(delta[k].data_ptr() not in (new[k].data_ptr(), pc.tensors[k].data_ptr()) for k in cur)
    frames2, dec2 = encode_with_roundtrip(Message("block", src=0, tensors=delta))
    pc.apply(dec2, False)
    assert [bytes(f) for f in frames[1:]] == payload_before  # in-flight payloads untouched by later updates
    assert all(torch.allclose(pc.tensors[k], new[k], atol=1e-6) for k in cur)
    # a full message replaces whatever drifted
    other = {k: torch.full_like(v, 3.0) for k, v in cur.items()}
    pc.encode_block(other, src=0, codec="int8", full=True)
    assert all(torch.equal(pc.tensors[k], other[k]) for k in cur)  # int8 of a constant is exact
    pc.reset()
    assert pc.tensors is None
    with pytest.raises(ValueError):
        pc.encode_block(other, src=0, full=False)


def test_public_copy_receiver_errors_leave_state_unchanged():
    rx = PublicCopy()
    with pytest.raises(WireError) as ei:
        rx.apply({"a": torch.ones(2)}, full=False)
    assert ei.value.reason == "no_base"
    rx.apply({"a": torch.ones(2), "b": torch.ones(3)}, full=True)
    snap = {k: v.clone() for k, v in rx.tensors.items()}
    for bad, reason in [({"a": torch.ones(2)}, "names"), ({"a": torch.ones(2), "c": torch.ones(3)}, "names"),
                        ({"a": torch.ones(2), "b": torch.ones(4)}, "shape")]:
        with pytest.raises(WireError) as ei:
            rx.apply(bad, full=False)
        assert ei.value.reason == reason
        assert all(torch.equal(rx.tensors[k], snap[k]) for k in snap)
    tx = PublicCopy()
    with pytest.raises(WireError):
        tx.encode_block({"a": torch.tensor([math.nan])}, src=0, full=True)
    assert tx.tensors is None  # failed encode does not advance the copy


# --------------------------------------------------------------------------------------- validation


def valid_frames(codec="raw", kind="block"):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)} if kind == "block" else {}
    return as_bytes(encode(Message(kind, src=1, inc=2, round=3, block=4, step=5, codec=codec, tensors=tensors,
                                   stats={"loss": 1.25})))


def with_header(frames, mutate):
    h = msgpack.unpackb(frames[0])
    mutate(h)
    return [msgpack.packb(h, use_bin_type=True), *frames[1:]]


def test_valid_frames_decode():
    for codec in CODECS:
        out = decode(valid_frames(codec))
        check_names(out, ["a", "b"], [(2, 3), (4,)])
        check_names(out, ["b", "a"], {"a": (2, 3), "b": (4,)})


@pytest.mark.parametrize(
    "frames_fn, reason",
    [
        (lambda f: [], "frames"),
        (lambda f: None, "frames"),
        (lambda f: 42, "frames"),
        (lambda f: f[0], "frames"),  # a single bytes object instead of a list
        (lambda f: [f[0], "text", f[2]], "frames"),
        (lambda f: [f[0], 3, f[2]], "frames"),
        (lambda f: f[:2], "frames"),  # too few payload frames
        (lambda f: [*f, b""], "frames"),  # too many
        (lambda f: [f[0]], "frames"),
        (lambda f: [b"\x00" * (MAX_HEADER_BYTES + 1)], "header_size"),
        (lambda f: [f[0] + b" " * MAX_HEADER_BYTES, *f[1:]], "header_size"),
        (lambda f: [b"", *f[1:]], "msgpack"),
        (lambda f: [b"\xc1", *f[1:]], "msgpack"),  # never-used byte
        (lambda f: [f[0][:-3], *f[1:]], "msgpack"),  # truncated
        (lambda f: [f[0] + b"\x00", *f[1:]], "msgpack"),  # trailing data
        (lambda f: [b"\x81\xa1v\xa2\xff\xfe", *f[1:]], "msgpack"),  # invalid utf-8
        (lambda f: [b"\x81\x01\x01", *f[1:]], "msgpack"),  # int map key (strict_map_key)
        (lambda f: [b"\xd4\x05\x00", *f[1:]], "msgpack"),  # ext type
        (lambda f: [b"\x91" * 5000 + b"\x90", *f[1:]], "msgpack"),  # deep nesting
        (lambda f: [msgpack.packb([1, 2]), *f[1:]], "schema"),  # header not a map
        (lambda f: [msgpack.packb(None), *f[1:]], "schema"),
        (lambda f: [f[0], f[1][:-1], f[2]], "nbytes"),  # frame shorter than nbytes
        (lambda f: [f[0], f[1] + b"\x00\x00\x00\x00", f[2]], "nbytes"),
        (lambda f: [f[0], f[1][:8] + np.float32(np.nan).tobytes() + f[1][12:], f[2]], "non_finite"),
        (lambda f: [f[0], f[1], np.array([1, np.inf, 1, 1], np.float32).tobytes()], "non_finite"),
        (lambda f: [f[0], f[1], np.array([1, 1, -np.inf, 1], np.float32).tobytes()], "non_finite"),
    ],
)
def test_frame_level_rejections(frames_fn, reason):
    expect(reason, frames_fn(valid_frames()))


def _set(path, value):
    def mutate(h):
        obj = h
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return mutate


def _del(path):
    def mutate(h):
        obj = h
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]
    return mutate


HEADER_CASES = [
    *[(_del([k]), "schema") for k in ["v", "kind", "src", "inc", "round", "block", "step", "codec", "full", "tensors", "stats"]],
    (_set(["extra"], 1), "schema"),
    (_set([b"bytes-key"], 1), "schema"),
    (_set(["v"], 1), "version"),  # protocol version 1 (another block order and fingerprint): refused
    (_set(["v"], 2), "version"),  # version 2 (raw blocks as deltas): refused
    (_set(["v"], 4), "version"),
    (_set(["v"], 0), "version"),
    (_set(["v"], "2"), "schema"),
    (_set(["v"], True), "schema"),  # bools are not ints
    (_set(["kind"], "gossip"), "kind"),
    (_set(["kind"], 1), "schema"),
    (_set(["codec"], "zstd"), "codec"),
    (_set(["codec"], None), "codec"),
    (_set(["src"], True), "schema"),
    (_set(["step"], False), "schema"),
    (_set(["round"], 1.0), "schema"),
    (_set(["block"], -1), "schema"),
    (_set(["inc"], "3"), "schema"),
    (_set(["src"], 2**64 - 1), "schema"),
    (_set(["full"], 1), "schema"),
    (_set(["full"], None), "schema"),
    (_set(["tensors"], {}), "schema"),
    (_set(["tensors", 0], [1, 2]), "schema"),
    (_del(["tensors", 0, "nbytes"]), "schema"),
    (_set(["tensors", 0, "scale"], 1.0), "schema"),  # raw has no codec fields
    (_set(["stats"], [1.0]), "schema"),
    (_set(["stats", "loss"], "1.0"), "schema"),
    (_set(["stats", "loss"], True), "schema"),
    (_set(["stats", "loss"], None), "schema"),
    (_set(["stats", ""], 1.0), "schema"),
    (_set(["stats", b"loss"], 1.0), "schema"),
    (_set(["stats", "loss"], math.nan), "non_finite"),
    (_set(["stats", "loss"], math.inf), "non_finite"),
    (_set(["stats", "loss"], -math.inf), "non_finite"),
    (_set(["tensors", 0, "dtype"], "object"), "dtype"),
    (_set(["tensors", 0, "dtype"], "<U4"), "dtype"),
    (_set(["tensors", 0, "dtype"], "float64"), "dtype"),
    (_set(["tensors", 0, "dtype"], "int8"), "dtype"),  # allowed dtype, but raw never sends it
    (_set(["tensors", 0, "dtype"], 5), "dtype"),
    (_set(["tensors", 0, "shape"], [3, 2, 1, 0]), "nbytes"),
    (_set(["tensors", 0, "shape"], [6]), None),  # same byte count, different shape: valid (check_names catches it)
    (_set(["tensors", 0, "shape"], [3, 3]), "nbytes"),
    (_set(["tensors", 0, "shape"], [-2, -3]), "shape"),
    (_set(["tensors", 0, "shape"], [2, True, 3]), "shape"),
    (_set(["tensors", 0, "shape"], [2.0, 3]), "shape"),
    (_set(["tensors", 0, "shape"], "2x3"), "shape"),
    (_set(["tensors", 0, "shape"], [1] * 33), "shape"),
    (_set(["tensors", 0, "shape"], [0, 2**40, 2**40]), "shape"),
    (_set(["tensors", 0, "shape"], [2**41, 0]), "shape"),
    (_set(["tensors", 0, "nbytes"], 25), "nbytes"),
    (_set(["tensors", 0, "nbytes"], -24), "nbytes"),
    (_set(["tensors", 0, "nbytes"], 24.0), "nbytes"),
    (_set(["tensors", 1, "name"], "a"), "names"),  # duplicate
    (_set(["tensors", 0, "name"], ""), "names"),
    (_set(["tensors", 0, "name"], "x" * 513), "names"),
    (_set(["tensors", 0, "name"], 7), "names"),
    (_set(["tensors", 0, "name"], None), "names"),
]


@pytest.mark.parametrize("mutate, reason", HEADER_CASES)
def test_header_rejections(mutate, reason):
    frames = with_header(valid_frames(), mutate)
    if reason is None:
        decode(frames)
    else:
        expect(reason, frames)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_set(["tensors", 0, "scale"], math.nan), "non_finite"),
        (_set(["tensors", 0, "scale"], math.inf), "non_finite"),
        (_set(["tensors", 0, "scale"], -0.5), "codec"),
        (_set(["tensors", 0, "scale"], "0.1"), "codec"),
        (_set(["tensors", 0, "scale"], 1), "codec"),
        (_set(["tensors", 0, "scale"], 1e300), "non_finite"),  # float32(scale) = inf -> decoded inf
        (_set(["tensors", 0, "scale"], 3e36), "non_finite"),  # q * scale overflows float32
        (_del(["tensors", 0, "scale"]), "schema"),
        (_set(["tensors", 0, "dtype"], "float32"), "dtype"),
        (_set(["tensors", 0, "extra"], 1), "schema"),
    ],
)
def test_int8_field_rejections(mutate, reason):
    expect(reason, with_header(valid_frames("int8"), mutate))


@pytest.mark.parametrize("codec, dtype", [("fp16", np.float16), ("raw", np.float16), ("bf16", None)])
def test_half_precision_non_finite(codec, dtype):
    frames = valid_frames(codec)
    if codec == "raw":  # raw may carry float16 payloads
        frames = with_header(frames, _set(["tensors", 1, "dtype"], "float16"))
        frames = with_header(frames, _set(["tensors", 1, "nbytes"], 8))
        frames[2] = np.ones(4, np.float16).tobytes()
        decode(frames)
    bad = np.array([1, np.nan, 1, 1], np.float16).tobytes() if dtype else b"\x80\x3f\xc0\x7f\x80\x3f\x80\x3f"
    expect("non_finite", [frames[0], frames[1], bad])


def test_tensors_on_header_only_kinds():
    block = valid_frames()
    for kind in ("hello", "bye", "resync"):
        expect("schema", with_header(block, _set(["kind"], kind)))
        hello = valid_frames(kind=kind)
        decode(hello)
        expect("frames", [*hello, b"\x00\x00\x80\x3f"])


def test_max_payload_bytes():
    frames = valid_frames()  # 24 + 16 bytes of payload
    decode(frames, max_payload_bytes=40)
    expect("payload_size", frames, max_payload_bytes=39)
    expect("payload_size", frames, max_payload_bytes=0)
    decode(valid_frames(kind="hello"), max_payload_bytes=0)


def test_header_length_checked_before_unpacking():
    hello = valid_frames(kind="hello")[0]
    at_limit = hello + b"\x00" * (MAX_HEADER_BYTES - len(hello))
    expect("msgpack", [at_limit])  # exactly 64 KiB is unpacked (and fails on the trailing bytes)
    expect("header_size", [at_limit + b"\x00"])  # one more byte is refused unread
    # the biggest legal stats map still fits
    big = {f"{i:0127d}": float(i) for i in range(wire.MAX_STATS)}
    assert decode(encode(Message("hello", src=0, stats=big))).stats == big
    expect("schema", with_header([hello], _set(["stats", "x" * 129], 1.0)))


def test_check_names():
    out = decode(valid_frames())
    check_names(out, ["a", "b"])
    for expected in (["a"], ["a", "b", "c"], ["a", "c"], []):
        with pytest.raises(WireError) as ei:
            check_names(out, expected)
        assert ei.value.reason == "names"
    with pytest.raises(WireError) as ei:
        check_names(out, ["a", "b"], [(3, 2), (4,)])
    assert ei.value.reason == "shape"
    with pytest.raises(WireError) as ei:
        check_names(out, ["a", "b"], {"a": (2, 3), "b": (2, 2)})
    assert ei.value.reason == "shape"


def test_wire_error_is_value_error_and_picklable():
    import pickle

    e = WireError("dtype", "bad\ndtype 'object'")
    assert isinstance(e, ValueError) and e.reason == "dtype" and "\n" not in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.reason == "dtype" and str(e2) == str(e)


# --------------------------------------------------------------------------------------- fuzz

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def assert_only_wire_error(frames, **kw):
    try:
        msg = decode(frames, **kw)
    except WireError as e:
        assert e.reason in REASONS and e.reason != "internal", repr(e)
        assert "\n" not in str(e)
    else:
        assert isinstance(msg, Message)
        assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in msg.tensors.values())


# WIRE_FUZZ_EXAMPLES=5000 pytest -k fuzz tests/test_wire.py for a longer run
FUZZ = settings(SETTINGS, max_examples=int(os.environ.get("WIRE_FUZZ_EXAMPLES", "150")))


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_header_bytes(blob):
    assert_only_wire_error([blob])


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=64), st.builds(bytearray, st.binary(max_size=16)),
                          st.integers(), st.none(), st.text(max_size=4)), max_size=5))
def test_fuzz_random_frame_lists(frames):
    assert_only_wire_error(frames)


@FUZZ
@given(st.lists(msgpack_values, min_size=1, max_size=4))
def test_fuzz_random_msgpack_headers(objs):
    assert_only_wire_error([msgpack.packb(objs[0]), *[msgpack.packb(o) for o in objs[1:]]])


_BASES = [valid_frames(c) for c in sorted(CODECS)] + [valid_frames(kind="hello")]


@FUZZ
@given(base=st.sampled_from(range(len(_BASES))), data=st.data())
def test_fuzz_mutated_header_fields(base, data):
    frames = list(_BASES[base])
    h = msgpack.unpackb(frames[0])
    # replace (or add) a value somewhere in the header tree
    obj, n = h, data.draw(st.integers(0, 3))
    for _ in range(n):
        if isinstance(obj, dict) and obj:
            k = data.draw(st.sampled_from(sorted(obj, key=str)))
            if isinstance(obj[k], (dict, list)) and obj[k]:
                obj = obj[k]
        elif isinstance(obj, list) and obj:
            i = data.draw(st.integers(0, len(obj) - 1))
            if isinstance(obj[i], (dict, list)) and obj[i]:
                obj = obj[i]
    if isinstance(obj, dict):
        key = data.draw(st.sampled_from(sorted(obj, key=str)) | st.text(max_size=4))
        obj[key] = data.draw(msgpack_values)
    elif obj:
        obj[data.draw(st.integers(0, len(obj) - 1))] = data.draw(msgpack_values)
    try:
        frames[0] = msgpack.packb(h)
    except (TypeError, ValueError, OverflowError):
        assume(False)
    assert_only_wire_error(frames, max_payload_bytes=data.draw(st.none() | st.integers(0, 100)))


@FUZZ
@given(base=st.sampled_from(range(len(_BASES))), data=st.data())
def test_fuzz_mutated_bytes_and_frames(base, data):
    frames = [bytearray(f) for f in _BASES[base]]
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup", "swap"]))
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            j = data.draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] = data.draw(st.integers(0, 255))
        elif op == "truncate" and frames:
            frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
        elif op == "extend" and frames:
            frames[i] += data.draw(st.binary(max_size=8))
        elif op == "drop" and frames:
            del frames[i]
        elif op == "dup" and frames:
            frames.insert(i, bytearray(frames[i]))
        elif op == "swap" and len(frames) > 1:
            frames[0], frames[-1] = frames[-1], frames[0]
    assert_only_wire_error(frames)
