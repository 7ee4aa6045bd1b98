"""Malformed and hostile input against live peers: two real `deca-peer start` processes train on a ring
while an attacker's ZeroMQ DEALERs connect to peer 0's ROUTER and send it garbage.

The attack, in three parts:

1. a catalogue of bad messages (random bytes, a truncated multipart message, an oversize header, an
   oversize payload, a wrong dtype, a wrong shape, NaN and Inf payloads, a spoofed ``src``, a stale
   round, a round the run does not have, a wrong block, an unknown protocol version) sent once under
   the routing id of peer 0's real neighbour, ``peer-1``, so every message goes through wire.decode and
   Gossip's checks and is counted under its own reason. With ROUTER_HANDOVER=1 that connection takes
   peer-1's pipe over: libzmq terminates the real neighbour's pipe without closing its TCP connection, so
   what peer 1 sends in the next ~3 s is lost until its heartbeat times out (HEARTBEAT_TIMEOUT 3 s) and it
   reconnects and takes its id back. Peer 0 then waits for the lost block for `exchange_timeout_s`, and
   the delta chain is repaired with a resync; the exchange timeout is set to 3 s here to bound the stall
   (with the default 60 s the pair stalls for a minute);
2. 500, then 4,500 more bad messages (the same catalogue, round-robin) from a non-neighbour routing id
   (``peer-9``) and from one that is not ``peer-<n>`` at all: Gossip drops those as ``unknown_sender``
   before decoding; peer 0's RSS growth between 500 and 5,000 must not exceed its unattacked twin's (peer 1:
   the same model, schedule and training in the same window) by more than 50 MB;
3. peer 0 must keep training (its step count keeps increasing after the attack) and stop cleanly on
   SIGTERM with exit code 0; its final metrics record counts every bad message in `dropped`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import msgpack
import psutil
import torch
import zmq

from conftest import deca_peer_cmd, free_base_port
from deca_p2p import wire

INNER_STEPS = 8
# Peer 0's RSS growth over the flood beyond peer 1's over the same window (its twin trains the same steps and
# receives none of the flood). Issue 11: the flood grew peer 0 by 70..92 MB (twin ~1 MB); not a leak but glibc
# keeping the pages of the dropped messages that had queued up while peer 0 trained (malloc_trim(0) handed them all
# back). The ROUTER now trims after every 16 MB from non-neighbours (transport_base.TRIM_AFTER_UNWANTED_BYTES):
# measured +3..7 MB against the twin's -1..+4 MB.
RSS_BOUND_MB = 50
PEER_ARGS = ["--rounds", 50, "--inner-steps", INNER_STEPS, "--batch-size", 4, "--threads", 1, "--seed", 1,
             "--exchange-timeout", 3, "--hello-timeout", 60,
             "--set", "train_per_task=100", "--set", "eval_per_task=3", "--set", "max_len=32",
             # the cadence the RSS bound was calibrated on: an evaluation every round
             "--set", "eval_every=0"]


# ------------------------------------------------------------------------------------------- helpers

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(__import__("conftest").REPO)
    return env


def _records(run_dir, peer: int) -> list[dict]:
    f = run_dir / f"peer-{peer}" / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return out


def _steps(run_dir, peer: int) -> list[dict]:
    return [r for r in _records(run_dir, peer) if r["event"] == "step"]


def _dropped_so_far(run_dir, peer: int) -> int:
    s = _steps(run_dir, peer)
    return s[-1]["dropped"] if s else 0


def _wait(cond, what: str, procs, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read().decode(errors="replace") if p.stdout else ""
                raise AssertionError(f"a peer exited with {p.returncode} while waiting for {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _block_layout():
    """(names, shapes) of every block of the embedded model, as the peers partition it."""
    from deca_p2p.config import make_config
    from deca_p2p.models import ensure_default_model, load_model
    from deca_p2p.trainer import make_blocks

    model, _ = load_model(ensure_default_model())
    named = dict(model.named_parameters())
    blocks = make_blocks(model, make_config(None, {}))
    return [list(b.param_names) for b in blocks], [[tuple(named[n].shape) for n in b.param_names] for b in blocks]


def _frames_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _repack(frames: list[bytes], edit) -> list[bytes]:
    h = msgpack.unpackb(frames[0], raw=False)
    edit(h)
    return [msgpack.packb(h, use_bin_type=True), *frames[1:]]


def catalogue(names, shapes, src: int, inc: int) -> list[tuple[str, list[bytes]]]:
    """(the reason peer 0 should count it under when it comes from routing id peer-<src>, frames)."""
    g = torch.Generator().manual_seed(0)

    def block_tensors(b, shape_of=None, fill=None):
        out = {}
        for n, s in zip(names[b], shapes[b]):
            t = torch.randn(shape_of(s) if shape_of else s, generator=g) * 0.01
            if fill is not None:
                t.view(-1)[len(t.view(-1)) // 2] = fill
            out[n] = t
        return out

    def msg(b=0, round_=0, step=0, src_=src, kind="block", tensors=None, **kw):
        return wire.Message(kind, src=src_, inc=inc, round=round_, block=b, step=step, full=True,
                            tensors=block_tensors(b) if tensors is None and kind == "block" else (tensors or {}), **kw)

    enc = lambda m, **kw: _frames_bytes(wire.encode(m, **kw))  # noqa: E731
    largest = max(sum(math.prod(s) for s in b) for b in shapes)
    multi = max(range(len(names)), key=lambda b: len(names[b]))  # the block with the most tensors
    full_multi = enc(msg(b=multi))
    cat = [
        ("msgpack", [b"\xc1" + os.urandom(200)]),                         # random bytes (0xc1: never valid msgpack)
        ("frames", full_multi[:1]),                                       # header only, tensors announced
        ("frames", full_multi[: len(full_multi) // 2]),                   # truncated multipart message
        ("header_size", [b"\x80" * (wire.MAX_HEADER_BYTES + 1024)]),      # header > 64 KiB
        ("payload_size", enc(msg(tensors={names[0][0]: torch.zeros(largest + 1024)}))),  # > the largest block
        ("dtype", _repack(enc(msg()), lambda h: h["tensors"][0].update(dtype="float64"))),
        ("dtype", _repack(enc(msg()), lambda h: h["tensors"][0].update(dtype="int8"))),   # not what raw sends
        ("shape", enc(msg(tensors=block_tensors(0, shape_of=lambda s: tuple(reversed(s)) if len(s) > 1 else (1, *s))))),
        ("non_finite", enc(msg(tensors=block_tensors(0, fill=float("nan"))), check_finite=False)),
        ("non_finite", enc(msg(tensors=block_tensors(0, fill=float("inf"))), check_finite=False)),
        ("spoofed_src", enc(msg(src_=src + 5))),                          # header src is not the routing id
        ("spoofed_src", enc(msg(kind="hello", src_=0))),                  # claims to be peer 0 itself
        ("stale", enc(msg(b=0, round_=0, step=0))),                       # an activation that is over
        ("position", enc(msg(round_=10**6))),                             # a round the run does not have
        ("names", enc(wire.Message("block", src=src, inc=inc, block=1 % len(names), full=True,
                                   tensors=block_tensors(0)))),           # block 1 with block 0's tensors
        ("names", enc(msg(tensors={"evil.weight": torch.zeros(3)}))),
        ("version", _repack(enc(msg()), lambda h: h.update(v=wire.VERSION - 1))),
        ("schema", _repack(enc(msg()), lambda h: h.update(extra="key"))),
    ]
    for reason, frames in cat:  # self-check: each is rejected by decode (or by Gossip) as announced
        try:
            wire.decode(frames, max_payload_bytes=4 * largest)
        except wire.WireError as e:
            assert e.reason == reason, (reason, e)
        else:  # decodes fine; Gossip's own checks reject it
            assert reason in ("shape", "spoofed_src", "stale", "position", "names"), reason
    return cat


class Attacker:
    """A DEALER with a chosen routing id, connected to one peer's ROUTER."""

    def __init__(self, ctx, endpoint: str, routing_id: bytes):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.setsockopt(zmq.RECONNECT_IVL, -1)  # never reconnect (no handover ping-pong with a real peer)
        self.sock.setsockopt(zmq.SNDTIMEO, 20_000)   # the peer reads only between its local steps
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames) -> None:
        self.sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


# ---------------------------------------------------------------------------------------------- test

def test_peer_survives_hostile_input(deca_cache, tmp_path):
    t_start = time.monotonic()
    marks = {}
    topo = tmp_path / "ring2.json"
    gen = subprocess.run(deca_peer_cmd("topology", "gen", "ring", 2), capture_output=True, env=_env(), timeout=60)
    assert gen.returncode == 0, gen.stderr
    topo.write_bytes(gen.stdout)
    base = free_base_port(2)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo, "--run-dir", run_dir,
                                            "--base-port", base, *PEER_ARGS),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
             for i in range(2)]
    ctx = zmq.Context()
    attackers: list[Attacker] = []
    try:
        names, shapes = _block_layout()
        # peer 0 is past its first activation (so round 0 / block 0 is stale) and peer 1's incarnation is known
        marks["layout"] = time.monotonic() - t_start
        _wait(lambda: len(_steps(run_dir, 0)) >= INNER_STEPS + 2, "peer 0 to train", procs, 90)
        marks["training"] = time.monotonic() - t_start
        inc1 = next(r["inc"] for r in _records(run_dir, 1) if r["event"] == "start")
        endpoint = f"tcp://127.0.0.1:{base}"
        cat = catalogue(names, shapes, src=1, inc=inc1)
        dropped0 = _dropped_so_far(run_dir, 0)

        # 1. the catalogue under the real neighbour's routing id: every message reaches wire.decode / Gossip
        spoof = Attacker(ctx, endpoint, b"peer-1")
        attackers.append(spoof)
        for _, frames in cat:
            spoof.send(frames)
        _wait(lambda: _dropped_so_far(run_dir, 0) >= dropped0 + len(cat), "peer 0 to drop the catalogue", procs, 30)
        spoof.close()
        marks["catalogue"] = time.monotonic() - t_start

        # 2. floods from a non-neighbour id and from a routing id that is not peer-<n>
        floods = [Attacker(ctx, endpoint, b"peer-9"), Attacker(ctx, endpoint, b"mallory\x00\xff")]
        attackers += floods
        sent = 0

        def flood(n: int, chunk: int = 250) -> None:
            """n more bad messages, in chunks that peer 0 must have dropped before the next one goes out: the
            queue in front of it stays as deep in both phases, so RSS differences are leaks, not queue depth."""
            nonlocal sent
            for start in range(0, n, chunk):
                k0 = sent
                for k in range(k0, k0 + min(chunk, n - start)):
                    floods[(k // len(cat)) % 2].send(cat[k % len(cat)][1])  # every kind from both ids
                    sent += 1
                target = dropped0 + len(cat) + sent
                _wait(lambda: _dropped_so_far(run_dir, 0) >= target, f"peer 0 to drop {sent} flooded messages", procs, 60)

        rss, rss1 = [], []
        peer0, peer1 = psutil.Process(procs[0].pid), psutil.Process(procs[1].pid)
        for n in (500, 4500):
            flood(n)
            rss.append(peer0.memory_info().rss)
            rss1.append(peer1.memory_info().rss)
        for a in floods:
            a.close()
        marks["flood"] = time.monotonic() - t_start

        # 3. training goes on: more steps after the attack, on both peers
        steps_after_attack = [len(_steps(run_dir, i)) for i in range(2)]
        _wait(lambda: all(len(_steps(run_dir, i)) >= steps_after_attack[i] + 2 * INNER_STEPS for i in range(2)),
              "both peers to keep training after the attack", procs, 60)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0].decode(errors="replace") for p in procs]
    finally:
        for a in attackers:
            a.close()
        ctx.term()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "Traceback" not in outs[0], outs[0][-3000:]

    final = [r for r in _records(run_dir, 0) if r["event"] == "final"]
    assert final and final[0]["stopped"] is True
    dropped = final[0]["dropped"]
    total_bad = len(cat) + sent
    assert sum(dropped.values()) >= total_bad, dropped
    assert dropped.get("unknown_sender", 0) >= sent, dropped
    # every catalogue message was counted under its own reason (it came with a neighbour's routing id)
    for reason in {r for r, _ in cat}:
        want = sum(1 for r, _ in cat if r == reason)
        assert dropped.get(reason, 0) >= want, (reason, dropped)
    assert dropped.get("internal", 0) == 0, dropped
    # memory: the second 4,500 bad messages leave no trace beyond allocator noise (training's own growth, seen
    # on the unattacked twin over the same window, is not theirs)
    grew_mb, twin_mb = (rss[1] - rss[0]) / 2**20, (rss1[1] - rss1[0]) / 2**20
    assert grew_mb - twin_mb < RSS_BOUND_MB, \
        f"peer 0 RSS grew {grew_mb:.1f} MB between 500 and 5000 bad messages, its twin {twin_mb:.1f} MB"
    # the neighbour was not harmed either: it trained and stopped cleanly
    final1 = [r for r in _records(run_dir, 1) if r["event"] == "final"]
    assert final1 and final1[0]["stopped"] is True
    print(f"hostile input: {total_bad} bad messages, dropped {dict(sorted(dropped.items()))}, "
          f"RSS {rss[0] / 2**20:.0f} -> {rss[1] / 2**20:.0f} MB (twin {rss1[0] / 2**20:.0f} -> "
          f"{rss1[1] / 2**20:.0f} MB), {time.monotonic() - t_start:.1f} s "
          f"({', '.join(f'{k} at {v:.1f} s' for k, v in marks.items())})")
