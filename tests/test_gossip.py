"""One gossip exchange over real ZeroMQ sockets on 127.0.0.1 (two transports in this process)."""
import threading
import time

import pytest
import torch

from conftest import free_base_port
from deca_p2p.gossip import Gossip
from deca_p2p.topology import ring
from deca_p2p.trainer import Schedule
from deca_p2p.transport import Transport

NAMES = [["w", "b"]]
SHAPES = [[(3, 2), (2,)]]


@pytest.fixture
def pair():
    base = free_base_port(2)
    eps = {i: f"tcp://127.0.0.1:{base + i}" for i in range(2)}
    trs = [Transport(i, eps, [1 - i], send_timeout_s=1.0) for i in range(2)]
    for t in trs:
        t.start()
    yield trs, eps
    for t in trs:
        t.close(send_bye=False)


def _gossip(tr, me, timeout=5.0, codec="raw"):
    sched = Schedule(n_blocks=1, rounds=1, inner_steps=4, order="ascending", seed=0)
    g = Gossip(tr, me, ring(2), sched, NAMES, block_shapes=SHAPES, timeout_s=timeout, inc=100 + me, codec=codec)
    g.begin_activation(0, 0)
    return g


def _block(seed):
    torch.manual_seed(seed)
    return {"w": torch.randn(3, 2), "b": torch.randn(2)}


@pytest.mark.parametrize("codec,atol", [("raw", 1e-6), ("bf16", 2e-2)])
def test_two_peers_mix_to_their_average(pair, codec, atol):
    """raw: every block goes whole; bf16: the first whole, the later ones as deltas against the public copy that
    sender and receiver both keep (error feedback), so the mix is the average up to bf16's rounding."""
    trs, _ = pair
    gs = [_gossip(trs[i], i, codec=codec) for i in range(2)]
    blocks = [_block(0), _block(1)]
    out = [None, None]
    for step in range(3):
        for b in blocks:
            b["w"] += 0.1 * step  # a changing block
        th = threading.Thread(target=lambda: out.__setitem__(1, gs[1].exchange(0, 0, step, blocks[1])))
        th.start()
        out[0] = gs[0].exchange(0, 0, step, blocks[0])
        th.join()
        for r in out:
            assert r.missing == []
        avg = [(blocks[0][k] + blocks[1][k]) / 2 for k in ("w", "b")]
        for r in out:
            for got, want in zip(r.mixed, avg):
                assert torch.allclose(got, want, atol=atol)
    assert sum(gs[0].dropped.values()) == 0
    # lossy: each side keeps the other's public copy, advanced by the deltas; raw keeps nothing per neighbour
    assert (gs[0].copies[1].tensors is not None) == (codec != "raw")


def test_silent_neighbour_is_left_out_and_not_waited_for_again(pair):
    trs, _ = pair
    g = _gossip(trs[0], 0, timeout=0.5)
    own = _block(2)
    r = g.exchange(0, 0, 0, own)
    assert r.missing == [1] and r.wait_s >= 0.5
    for got, want in zip(r.mixed, own.values()):
        assert torch.equal(got, want)  # the self weight absorbed the missing neighbour
    r = g.exchange(0, 0, 1, own)
    assert r.missing == [1] and r.wait_s < 0.4  # suspect: not waited for again


def _drain(g, tr, until, seconds=20):
    """Read what is still queued for G (a loaded machine may deliver after the exchange) until UNTIL() holds."""
    deadline = time.time() + seconds
    while not until() and time.time() < deadline:
        got = tr.recv(0.2)
        if got is not None:
            g._handle(*got, seq=0, arrived={})


def test_garbage_and_spoofed_messages_are_dropped_and_counted(pair):
    trs, _ = pair
    g = _gossip(trs[0], 0, timeout=0.6)
    from deca_p2p import wire

    # sent by the real neighbour's transport (a rogue socket taking over its routing id is tests/test_hostile_input.py)
    trs[1].send(0, [b"\x00garbage"])
    trs[1].send(0, [b"\xff" * 10, b"x"])
    spoof = wire.encode(wire.Message(kind="block", src=7, full=True, tensors={"w": torch.zeros(3, 2), "b": torch.zeros(2)}))
    trs[1].send(0, spoof)
    r = g.exchange(0, 0, 0, _block(3))
    assert r.missing == [1]
    _drain(g, trs[0], lambda: sum(g.dropped.values()) >= 3 and g.dropped["spoofed_src"])
    assert sum(g.dropped.values()) >= 3, g.dropped
    assert g.dropped["spoofed_src"] == 1


def test_a_resync_gets_a_full_block_on_that_link_only():
    """PROTOCOL.md §8.2: after a resync from 1, peer 0 sends 1 its new public copy in full (raw float32) and 2 the
    delta (int8 here); all three copies of 0's block stay bit-identical, and 2's chain is not disturbed."""
    import msgpack

    from deca_p2p import wire

    base = free_base_port(3)
    eps = {i: f"tcp://127.0.0.1:{base + i}" for i in range(3)}
    trs = [Transport(i, eps, [j for j in range(3) if j != i], send_timeout_s=1.0) for i in range(3)]
    for t in trs:
        t.start()
    try:
        sched = Schedule(n_blocks=1, rounds=1, inner_steps=4, order="ascending", seed=0)
        gs = [Gossip(trs[i], i, ring(3), sched, NAMES, block_shapes=SHAPES, timeout_s=5.0, inc=100 + i,
                     codec="int8" if i == 0 else "raw") for i in range(3)]
        for g in gs:
            g.begin_activation(0, 0)
        sent = []
        send0 = trs[0].send
        trs[0].send = lambda dst, frames: (sent.append((dst, msgpack.unpackb(bytes(frames[0])))), send0(dst, frames))
        blocks = [_block(i) for i in range(3)]
        trs[1].send(0, wire.encode(wire.Message("resync", src=1, inc=101)))  # read by 0 during exchange 0
        for step in range(3):
            for b in blocks:
                b["w"] += 0.1
            ths = [threading.Thread(target=gs[i].exchange, args=(0, 0, step, blocks[i])) for i in (1, 2)]
            for th in ths:
                th.start()
            r = gs[0].exchange(0, 0, step, blocks[0])
            for th in ths:
                th.join()
            assert r.missing == []
        blocks_sent = [(dst, h["step"], h["full"], h["codec"]) for dst, h in sent if h["kind"] == "block"]
        assert sorted(blocks_sent) == [(1, 0, True, "int8"), (1, 1, True, "raw"), (1, 2, False, "int8"),
                                       (2, 0, True, "int8"), (2, 1, False, "int8"), (2, 2, False, "int8")]
        for k in ("w", "b"):
            assert torch.equal(gs[1].copies[0].tensors[k], gs[0].own.tensors[k])
            assert torch.equal(gs[2].copies[0].tensors[k], gs[0].own.tensors[k])
        assert all(not g.dropped for g in gs), [g.dropped for g in gs]
    finally:
        for t in trs:
            t.close(send_bye=False)


def test_a_neighbour_that_said_bye_first_still_gets_ours(pair):
    """PROTOCOL.md §10.4: peer 1 leaves first and waits in its finish for 0's answer; 0 has marked it gone (it read
    1's bye in an exchange) and must still say bye to it, or 1 waits out its whole timeout."""
    trs, _ = pair
    gs = [_gossip(trs[i], i) for i in range(2)]
    th = threading.Thread(target=gs[1].finish, args=(20.0,))
    th.start()
    r = gs[0].exchange(0, 0, 0, _block(0))
    assert 1 in gs[0].gone and r.missing == [1]
    gs[0].finish(5.0)
    th.join(15.0)
    assert not th.is_alive()
    assert 0 in gs[1].gone  # 1's finish ended on 0's bye, not on its timeout


def test_blocks_that_break_the_exchange_rules_are_dropped_by_reason(pair):
    """PROTOCOL.md §8: a raw block that is not whole (raw_delta); a lossy delta whose predecessor never came
    (chain_gap: and a resync goes back to its sender); a block further ahead than the look-ahead window
    (too_far_ahead); one a little ahead is kept for its exchange."""
    from deca_p2p import wire

    trs, _ = pair
    sched = Schedule(n_blocks=1, rounds=1, inner_steps=10, order="ascending", seed=0)
    g = Gossip(trs[0], 0, ring(2), sched, NAMES, block_shapes=SHAPES, timeout_s=0.6, inc=100)
    g.begin_activation(0, 0)
    z = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}

    def block(step, codec, full):
        return wire.encode(wire.Message("block", src=1, inc=101, step=step, codec=codec, full=full, tensors=z))

    trs[1].send(0, block(0, "raw", False))
    trs[1].send(0, block(0, "bf16", False))
    trs[1].send(0, block(2, "raw", True))              # 2 ahead: buffered (window 4)
    trs[1].send(0, block(9, "raw", True))              # 9 ahead: dropped
    r = g.exchange(0, 0, 0, _block(4))
    assert r.missing == [1]
    want = {"raw_delta": 1, "chain_gap": 1, "too_far_ahead": 1}
    _drain(g, trs[0], lambda: all(g.dropped[k] >= n for k, n in want.items()))
    assert dict(g.dropped) == want
    assert 2 in g.pending[1]
    resync = None
    deadline = time.time() + 20
    while resync is None and time.time() < deadline:
        got = trs[1].recv(0.2)
        if got is not None and got[0] == 0:
            msg = wire.decode(got[1])
            resync = msg if msg.kind == "resync" else None
    assert resync is not None and resync.src == 0


def test_blocks_of_a_neighbour_whose_hello_carried_another_configuration_are_dropped():
    """A restarted neighbour (a new incarnation) whose fingerprint differs: the transport refuses its hello, and
    gossip drops that incarnation's blocks as `config` (PROTOCOL.md §6.1)."""
    from deca_p2p import wire

    base = free_base_port(2)
    eps = {i: f"tcp://127.0.0.1:{base + i}" for i in range(2)}
    trs = [Transport(i, eps, [1 - i], send_timeout_s=1.0, hello_cfg={"protocol": "3", "algo": "deca"})
           for i in range(2)]
    for t in trs:
        t.start()
    try:
        sched = Schedule(n_blocks=1, rounds=1, inner_steps=4, order="ascending", seed=0)
        g = Gossip(trs[0], 0, ring(2), sched, NAMES, block_shapes=SHAPES, timeout_s=0.6, inc=100)
        g.begin_activation(0, 0)
        trs[1].send(0, wire.encode(wire.Message("hello", src=1, inc=202, cfg={"protocol": "3", "algo": "dadam"})))
        z = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
        trs[1].send(0, wire.encode(wire.Message("block", src=1, inc=202, step=0, full=True, tensors=z)))
        r = g.exchange(0, 0, 0, _block(5))
        assert r.missing == [1]
        _drain(g, trs[0], lambda: g.dropped["config"] >= 2)
        assert dict(g.dropped) == {"config": 2}  # every message of that incarnation: its hello and its block
        assert "algo" in trs[0].cfg_rejected[(1, 202)]
    finally:
        for t in trs:
            t.close(send_bye=False)
