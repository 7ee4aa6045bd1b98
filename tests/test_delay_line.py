"""The receiving end of emulated links (deca_p2p/delay_line.py): the pure delay line, then a real Transport holding
stamped messages from real ZeroMQ sockets on 127.0.0.1, including stamps a hostile sender made up."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import zmq

from deca_p2p.bootstrap import free_ports
from deca_p2p.delay_line import STAMP_LEN, DelayLine, is_stamp, split_stamp, stamp_frame
from deca_p2p.transport import LinkSpec, Transport

pytestmark = pytest.mark.timeout(60)


# -- the pure parts ----------------------------------------------------------------------------

def test_stamp_round_trip_and_never_a_msgpack_header():
    import msgpack

    f = stamp_frame(1234.5)
    assert len(f) == STAMP_LEN and is_stamp(f)
    assert split_stamp([f, b"h", b"p"]) == (1234.5, True, [b"h", b"p"])
    assert split_stamp([b"h"]) == (None, False, [b"h"])
    assert split_stamp([]) == (None, False, [])
    # a header is a msgpack map: it never starts with 0xC1, whatever it holds
    assert not is_stamp(msgpack.packb({"v": 3, "kind": "bye", "src": 1, "inc": 0, "x": "12"}))
    for bad in (math.nan, math.inf, -math.inf):
        assert split_stamp([b"\xc1" + struct.pack(">d", bad), b"h"]) == (None, True, [b"h"])


def test_release_in_due_order_ties_in_arrival_order():
    d = DelayLine()
    assert not d.hold("a", "past", 9.0, now=10.0)     # due already: the caller delivers it
    assert d.hold("a", "a2", 12.0, now=10.0)
    assert d.hold("b", "b1", 11.0, now=10.0)
    assert d.hold("a", "a3", 12.0, now=10.0)
    assert d.next_due() == 11.0 and len(d) == 3
    assert d.pop_due(10.9) is None
    assert [d.pop_due(12.0) for _ in range(4)] == ["b1", "a2", "a3", None]


def test_far_stamps_are_clamped_and_a_flood_is_cut_short_per_sender():
    d = DelayLine(max_hold_s=5.0, max_held_per_src=3)
    assert d.hold("evil", "e1", 1e12, now=0.0)
    assert d.clamped == 1 and d.next_due() == 5.0
    for k in range(2, 5):                        # the 4th held from one sender lets its earliest go now
        d.hold("evil", f"e{k}", 1.0 + k, now=1.0)
    d.hold("good", "g1", 2.5, now=1.0)
    assert d.cut_short == 1
    assert d.pop_due(1.0) == "e2"                # e1 was clamped to 5.0, so e2 (due 3.0) was the earliest
    assert d.pop_due(2.6) == "g1"                # another sender's message is not held back by the flood
    assert d.pop_due(10.0) == "e3"


# -- a real Transport --------------------------------------------------------------------------

def _raw_dealer(ctx: zmq.Context, rid: bytes, endpoint: str) -> zmq.Socket:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.ROUTING_ID, rid)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(endpoint)
    return d


def test_transport_holds_stamped_messages_and_defuses_hostile_stamps():
    eps = {i: f"tcp://127.0.0.1:{p}" for i, p in enumerate(free_ports(3))}
    t = Transport(0, eps, [1, 2], linger_ms=0)
    t.start()
    t._delay = DelayLine(max_hold_s=0.5)  # 60 s in production: too long to wait for here
    ctx = zmq.Context.instance()
    one, two = _raw_dealer(ctx, b"peer-1", eps[0]), _raw_dealer(ctx, b"peer-2", eps[0])
    try:
        # held until its due time, not delivered on arrival
        t0 = time.time()
        one.send_multipart([stamp_frame(t0 + 0.3), b"due"])
        r = t.recv(5.0)
        assert r is not None and r[0] == 1 and [f.bytes for f in r[1]] == [b"due"]
        assert 0.29 <= time.time() - t0 < 0.5
        # a stamp from the far future is held only max_hold_s; meanwhile another neighbour's message goes through
        t0 = time.time()
        one.send_multipart([stamp_frame(t0 + 1e9), b"far"])
        time.sleep(0.05)
        two.send_multipart([b"now"])
        r = t.recv(5.0)
        assert r is not None and r[0] == 2 and time.time() - t0 < 0.3
        r = t.recv(5.0)
        assert r is not None and [f.bytes for f in r[1]] == [b"far"] and 0.45 <= time.time() - t0 < 1.0
        assert t.held_stamps()["stamps_clamped"] == 1
        # a stamp that is no number: removed, counted, the message goes on at once
        one.send_multipart([b"\xc1" + struct.pack(">d", math.nan), b"nan"])
        r = t.recv(5.0)
        assert r is not None and [f.bytes for f in r[1]] == [b"nan"] and t.held_stamps()["bad_stamps"] == 1
        # recv's timeout still holds while a message waits for a later due time
        one.send_multipart([stamp_frame(time.time() + 0.4), b"later"])
        t0 = time.monotonic()
        assert t.recv(0.1) is None and 0.09 <= time.monotonic() - t0 < 0.3
        assert t.recv(5.0) is not None
    finally:
        one.close()
        two.close()
        t.close(send_bye=False)


def test_an_emulated_link_overlaps_the_hosts_own_copying():
    """1 Gbit/s, 8 MiB: the message arrives about S/R after it was sent. Handed over whole at S/R, it would arrive
    S/R + the host's own delivery time later (several ms for 8 MiB here)."""
    eps = {i: f"tcp://127.0.0.1:{p}" for i, p in enumerate(free_ports(2))}
    a = Transport(0, eps, [1], {1: LinkSpec(bandwidth_mbps=1000.0)}, linger_ms=0)
    b = Transport(1, eps, [0], linger_ms=0)
    a.start()
    b.start()
    try:
        data = np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8)
        ideal = (data.nbytes + 1) * 8 / 1e9
        deadline = time.monotonic() + 10
        while b.recv(0.05) is None and time.monotonic() < deadline:   # until the link is up
            a.send(1, [b"p"])
        while b.recv(0.1) is not None:
            pass
        times = []
        for _ in range(5):
            time.sleep(2 * ideal)  # the emulated link is idle again
            t0 = time.monotonic()
            a.send(1, [b"h", data])
            r = b.recv(5.0)
            times.append(time.monotonic() - t0)
            assert r is not None and r[1][1].bytes == data.tobytes()
        best = min(times)
        print(f"8 MiB at 1 Gbit/s: S/R {ideal * 1e3:.2f} ms, arrivals {[round(x * 1e3, 2) for x in times]} ms")
        assert ideal <= best <= ideal * 1.05 + 0.5e-3
    finally:
        a.close(send_bye=False)
        b.close(send_bye=False)
