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
    # a header is a msgpack map: even one of exactly a stamp's length never starts with 0xC1
    header = msgpack.packb({"ab": 1234567})
    assert len(header) == STAMP_LEN and not is_stamp(header)
    for bad in (math.nan, math.inf, -math.inf):
        assert split_stamp([b"\xc1" + struct.pack(">d", bad), b"h"]) == (None, True, [b"h"])


def test_release_in_due_order_ties_in_arrival_order():
    d = DelayLine()
    assert not d.hold("a", "past", 10, 9.0, now=10.0)     # due already: the caller delivers it
    assert not d.hold("a", "plain", 10, None, now=10.0)   # no stamp, nothing of its sender held: at once too
    assert d.hold("a", "a2", 10, 12.0, now=10.0)
    assert d.hold("b", "b1", 10, 11.0, now=10.0)
    assert d.hold("a", "a3", 10, 12.0, now=10.0)
    assert d.next_due() == 11.0 and len(d) == 3
    assert d.pop_due(10.9) is None
    assert [d.pop_due(12.0) for _ in range(4)] == ["b1", "a2", "a3", None]


def test_one_senders_messages_never_overtake_each_other():
    d = DelayLine()
    assert d.hold("a", "k", 10, 5.0, now=1.0)
    # due before k (a stamp from a clock that stepped back), due already, or no stamp at all: all wait behind k
    assert d.hold("a", "k+1", 10, 2.0, now=1.5)
    assert d.hold("a", "k+2", 10, 1.0, now=1.6)
    assert d.hold("a", "k+3", 10, None, now=1.7)
    assert d.hold("b", "other", 10, None, now=1.8) is False   # another sender's: not held back
    assert d.pop_due(4.9) is None
    assert [d.pop_due(5.0) for _ in range(5)] == ["k", "k+1", "k+2", "k+3", None]
    assert not d.hold("a", "then", 10, None, now=6.0)          # nothing of a's is held any more


def test_far_stamps_are_clamped_and_a_flood_is_cut_short_per_sender():
    d = DelayLine(max_hold_s=5.0, max_held_per_src=3)
    assert d.hold("evil", "e1", 0, 1e12, now=0.0)
    assert d.clamped == 1 and d.next_due() == 5.0
    for k in range(2, 5):   # the 4th held from one sender lets its earliest go now; order within the sender stays
        d.hold("evil", f"e{k}", 0, 2.0 + k, now=1.0)
    d.hold("good", "g1", 0, 2.5, now=1.0)
    assert d.cut_short == 1
    assert d.pop_due(1.0) == "e1"
    assert d.pop_due(2.6) == "g1"                # another sender's message is not held back by the flood
    # e2's stamp (4.0) was earlier than e1's clamped due time: it waited behind e1 until then
    assert d.pop_due(4.9) is None and d.pop_due(5.0) == "e2" and d.clamped == 1
    # the bound grows with the message: an honest slow link may hold a large block longer
    big = DelayLine(max_hold_s=5.0)
    assert big.hold("s", "block", 100_000_000, 90.0, now=0.0) and big.clamped == 0


def test_held_bytes_per_sender_are_bounded():
    d = DelayLine(max_held_bytes_per_src=100)
    assert d.hold("a", "x", 60, 9.0, now=0.0)
    assert d.hold("a", "y", 60, 9.0, now=0.0)    # 120 > 100: x goes out now
    assert d.cut_short == 1 and d.pop_due(0.0) == "x" and d.pop_due(8.0) is None
    assert d.hold("a", "huge", 500, 9.0, now=1.0) and d.pop_due(1.0) == "y"   # the newest always fits alone
    assert d.pop_due(9.0) == "huge" and len(d) == 0


# -- a real Transport --------------------------------------------------------------------------

def _raw_dealer(ctx: zmq.Context, rid: bytes, endpoint: str) -> zmq.Socket:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.ROUTING_ID, rid)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(endpoint)
    return d


def _connected(t: Transport, *dealers: zmq.Socket) -> None:
    """Until each raw DEALER's unstamped probe has come through."""
    for d in dealers:
        deadline = time.monotonic() + 10
        while True:
            d.send_multipart([b"probe"])
            r = t.recv(0.2)
            if r is not None:
                break
            assert time.monotonic() < deadline, "a raw DEALER never connected"
    while t.recv(0.1) is not None:
        pass


def test_transport_holds_stamped_messages_in_order_and_defuses_hostile_stamps():
    eps = {i: f"tcp://127.0.0.1:{p}" for i, p in enumerate(free_ports(3))}
    t = Transport(0, eps, [1, 2], linger_ms=0)
    t.start()
    t._delay = DelayLine(max_hold_s=0.5)  # 60 s in production: too long to wait for here
    ctx = zmq.Context.instance()
    one, two = _raw_dealer(ctx, b"peer-1", eps[0]), _raw_dealer(ctx, b"peer-2", eps[0])
    try:
        _connected(t, one, two)
        # held until its due time, not delivered on arrival; what its sender sends next, stamped or not, due
        # already or not, comes after it
        t0 = time.time()
        one.send_multipart([stamp_frame(t0 + 0.3), b"due"])
        one.send_multipart([stamp_frame(t0 - 1.0), b"behind"])
        one.send_multipart([b"unstamped"])
        got = [t.recv(5.0) for _ in range(3)]
        assert [r[1][0].bytes for r in got] == [b"due", b"behind", b"unstamped"] and {r[0] for r in got} == {1}
        assert time.time() - t0 >= 0.29
        # a stamp from the far future is held only max_hold_s; meanwhile another neighbour's message goes through
        t0 = time.monotonic()
        one.send_multipart([stamp_frame(time.time() + 1e9), b"far"])
        time.sleep(0.05)
        two.send_multipart([b"now"])
        r = t.recv(5.0)
        assert r is not None and r[0] == 2 and time.monotonic() - t0 < 0.45
        r = t.recv(5.0)
        assert r is not None and [f.bytes for f in r[1]] == [b"far"] and time.monotonic() - t0 >= 0.45
        assert t.held_stamps()["stamps_clamped"] == 1
        # a stamp that is no number: removed, counted, the message goes on at once
        one.send_multipart([b"\xc1" + struct.pack(">d", math.nan), b"nan"])
        r = t.recv(5.0)
        assert r is not None and [f.bytes for f in r[1]] == [b"nan"] and t.held_stamps()["bad_stamps"] == 1
        # recv's timeout still holds while a message waits for a later due time
        one.send_multipart([stamp_frame(time.time() + 1.0), b"later"])
        time.sleep(0.1)
        t0 = time.monotonic()
        assert t.recv(0.1) is None and 0.09 <= time.monotonic() - t0 < 0.8
        # and a due message queued behind one the delay line takes comes out of a zero-timeout recv
        two.send_multipart([b"ready"])
        time.sleep(0.1)
        r = t.recv(0.0)
        assert r is not None and r[0] == 2
        assert t.recv(5.0)[1][0].bytes == b"later"
    finally:
        one.close()
        two.close()
        t.close(send_bye=False)


def _one_way(a: Transport, b: Transport, data: np.ndarray, idle_s: float, n: int = 5) -> float:
    """The fastest of n a->b deliveries of one message of ``data``, ``idle_s`` apart."""
    times = []
    for _ in range(n):
        time.sleep(idle_s)
        t0 = time.monotonic()
        a.send(1, [b"h", data])
        r = b.recv(5.0)
        times.append(time.monotonic() - t0)
        assert r is not None and r[1][1].bytes == data.tobytes()
    return min(times)


def test_an_emulated_link_overlaps_the_hosts_own_copying():
    """1 Gbit/s, 8 MiB: the message arrives about S/R after it was sent, not S/R plus the time the hosts take to
    deliver it (measured here on a link without emulation), as it did when handed over whole at S/R."""
    eps = {i: f"tcp://127.0.0.1:{p}" for i, p in enumerate(free_ports(4))}
    a = Transport(0, eps, [1], {1: LinkSpec(bandwidth_mbps=1000.0)}, linger_ms=0)
    b = Transport(1, eps, [0], linger_ms=0)
    plain = Transport(0, {0: eps[2], 1: eps[3]}, [1], linger_ms=0)
    plain_rx = Transport(1, {0: eps[2], 1: eps[3]}, [0], linger_ms=0)
    ts = (a, b, plain, plain_rx)
    for t in ts:
        t.start()
    try:
        for tx, rx in ((a, b), (plain, plain_rx)):
            deadline = time.monotonic() + 10
            while rx.recv(0.05) is None:   # until the link is up
                assert time.monotonic() < deadline
                tx.send(1, [b"p"])
            while rx.recv(0.1) is not None:
                pass
        data = np.random.default_rng(0).integers(0, 256, size=8 << 20, dtype=np.uint8)
        ideal = (data.nbytes + 1) * 8 / 1e9
        delivery = _one_way(plain, plain_rx, data, 0.02)
        emulated = _one_way(a, b, data, 2 * ideal)   # the emulated link is idle again
        print(f"8 MiB at 1 Gbit/s: S/R {ideal * 1e3:.2f} ms, emulated {emulated * 1e3:.2f} ms, "
              f"the hosts' delivery alone {delivery * 1e3:.2f} ms")
        assert ideal <= emulated < ideal + 0.5 * delivery
    finally:
        for t in ts:
            t.close(send_bye=False)
