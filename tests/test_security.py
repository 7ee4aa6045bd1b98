"""--secure: ZeroMQ CURVE with an allow-list from the bootstrap file; senders identified by their key.

Real sockets on 127.0.0.1 (free ports, bounded waits); the end-to-end test runs real `deca-peer start --secure`
processes.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from click.testing import CliRunner

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p import wire
from deca_p2p.cli import _passthrough, main
from deca_p2p.gossip import Gossip
from deca_p2p.keys import KeysError, load_curve, make_keys, secret_key_path
from deca_p2p.topology import ring
from deca_p2p.trainer import Schedule
from deca_p2p.transport import CurveConfig, Transport, TransportError

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")]

NAMES = [["w", "b"]]
SHAPES = [[(3, 2), (2,)]]


def _eps(n: int) -> dict[int, str]:
    base = free_base_port(n)
    return {i: f"tcp://127.0.0.1:{base + i}" for i in range(n)}


@pytest.fixture
def net():
    """Keypairs for peers 0..2 and a factory of secure transports (closed at the end)."""
    keys = {i: zmq.curve_keypair() for i in range(3)}
    publics = {i: k[0] for i, k in keys.items()}
    eps = _eps(3)
    made: list[Transport] = []
    extra: list[zmq.Context] = []

    def make(i: int, nbrs, start=True, **kw) -> Transport:
        kw.setdefault("linger_ms", 200)
        kw.setdefault("send_timeout_s", 0.5)
        t = Transport(i, eps, nbrs, curve=CurveConfig(keys[i][0], keys[i][1], publics), **kw)
        made.append(t)
        if start:
            t.start()
        return t

    def dealer(routing_id: bytes, keypair=None, server: int = 0) -> zmq.Socket:
        ctx = zmq.Context()
        extra.append(ctx)
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, routing_id)
        if keypair is not None:
            s.setsockopt(zmq.CURVE_PUBLICKEY, keypair[0])
            s.setsockopt(zmq.CURVE_SECRETKEY, keypair[1])
            s.setsockopt(zmq.CURVE_SERVERKEY, publics[server])
        s.connect(eps[server])
        return s

    yield make, dealer, keys, eps
    for t in made:
        t.close(send_bye=False)
    for ctx in extra:
        ctx.destroy(linger=0)


def _recv_all(t: Transport, seconds: float) -> list:
    out, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        r = t.recv(left)
        if r is not None:
            out.append(r)
    return out


def _block(seed):
    torch.manual_seed(seed)
    return {"w": torch.randn(3, 2), "b": torch.randn(2)}


def _frames(msg) -> list[bytes]:
    return [bytes(memoryview(f)) for f in wire.encode(msg)]


# --------------------------------------------------------------------------- transport

def test_secure_peers_exchange_and_are_identified_by_key(net):
    make, _, keys, _ = net
    t0, t1 = make(0, [1]), make(1, [0])
    t1.send(0, _frames(wire.Message("hello", src=1, inc=7)))
    src, frames = _recv_all(t0, 1.0)[0]
    assert src == 1
    assert frames[0].get("User-Id") == keys[1][0].decode()  # ZAP's User-Id is the client's z85 key
    assert t0.counters()[1].msgs_recv == 1 and t0.spoofed_routing_ids == 0 and t0.rejected_keys == 0
    assert t0.rejected_handshakes == 0 and t1.rejected_handshakes == 0  # allowed peers are never counted
    assert t1.counters()[0].msgs_sent == 1


def test_no_message_from_a_process_without_an_allowed_key_is_accepted(net):
    make, dealer, keys, _ = net
    notes: list[str] = []
    t0 = make(0, [1, 2], log=notes.append)
    hello1 = _frames(wire.Message("hello", src=1, inc=1))
    outsiders = [
        dealer(b"peer-1"),                                              # plain ZeroMQ, no CURVE
        dealer(b"peer-1", zmq.curve_keypair()),                         # CURVE, its own key: not in the allow-list
        dealer(b"peer-1", (keys[1][0], zmq.curve_keypair()[1])),        # claims peer 1's public key, wrong secret
    ]
    for _ in range(5):
        for s in outsiders:
            try:
                s.send_multipart(hello1, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
    # a plain, non-secure Transport claiming to be peer 1 gets nowhere either
    plain = Transport(1, net[3], [0], send_timeout_s=0.3, linger_ms=0)
    plain.start()
    try:
        plain.send(0, hello1)
        assert _recv_all(t0, 1.5) == []
    finally:
        plain.close(send_bye=False)
    assert all(c.msgs_recv == 0 for c in t0.counters().values())
    assert t0.unknown_msgs_recv == 0
    assert t0.rejected_keys >= 1  # the keyed outsider reached the ZAP handler and was refused
    # every refused handshake is counted (PROTOCOL.md §12.2): the unknown key by ZAP (auth), the clients without
    # CURVE (mechanism mismatch) and the stolen public key without its secret (cryptographic) by the protocol
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"auth", "protocol"} <= set(t0.handshake_failures):
        time.sleep(0.1)
    assert t0.handshake_failures.get("auth", 0) >= 1 and t0.handshake_failures.get("protocol", 0) >= 1, \
        t0.handshake_failures
    assert t0.rejected_handshakes == sum(t0.handshake_failures.values()) >= 2
    assert len(notes) == 1 and notes[0].startswith("refused a connection to ") and "rejected_handshakes" in notes[0]


def test_a_peer_with_a_valid_key_cannot_pretend_to_be_another_peer(net):
    make, dealer, keys, _ = net
    t0, t1 = make(0, [1, 2]), make(1, [0, 2])
    mallory = dealer(b"peer-1", keys[2])  # peer 2's valid key, peer 1's routing id
    mallory.send_multipart(_frames(wire.Message("hello", src=1, inc=5)))
    got = _recv_all(t0, 1.0)
    assert [src for src, _ in got] == [2]  # attributed to the key's owner, not to the routing id's claim
    assert t0.spoofed_routing_ids == 1
    # the real peer 1 is not cut off by the routing-id clash (secure routing ids are unguessable)
    t1.send(0, _frames(wire.Message("hello", src=1, inc=9)))
    got = _recv_all(t0, 1.0)
    assert [src for src, _ in got] == [1]
    assert wire.decode(got[0][1]).inc == 9


def test_spoofed_blocks_are_dropped_by_gossip(net):
    make, dealer, keys, _ = net
    topo = ring(3)  # a triangle: 0's neighbours are 1 and 2
    t0, t1 = make(0, [1, 2]), make(1, [0, 2])
    sched = Schedule(n_blocks=1, rounds=1, inner_steps=4, order="ascending", seed=0)
    gs = [Gossip(t, i, topo, sched, NAMES, block_shapes=SHAPES, timeout_s=1.5, inc=100 + i) for i, t in ((0, t0), (1, t1))]
    for g in gs:
        g.begin_activation(0, 0)
    mallory = dealer(b"peer-1", keys[2])
    poison = {"w": torch.full((3, 2), 1e3), "b": torch.full((2,), 1e3)}
    mallory.send_multipart(_frames(wire.Message(kind="block", src=1, inc=101, full=True, round=0, block=0, step=0,
                                                tensors=poison)))
    blocks = [_block(0), _block(1)]
    out = [None]
    th = threading.Thread(target=lambda: out.__setitem__(0, gs[1].exchange(0, 0, 0, blocks[1])))
    th.start()
    r = gs[0].exchange(0, 0, 0, blocks[0])
    th.join()
    assert gs[0].dropped["spoofed_src"] == 1, gs[0].dropped
    assert r.arrived == [1] and r.missing == [2]
    w = topo.weight_row(0)
    for k, got in zip(("w", "b"), r.mixed):  # peer 1's real block went in, the forged one did not
        want = (1 - w[1]) * blocks[0][k] + w[1] * blocks[1][k]
        assert torch.allclose(got, want, atol=1e-6)


def test_secure_transport_rejects_inconsistent_keys():
    pub, sec = zmq.curve_keypair()
    other = zmq.curve_keypair()[0]
    with pytest.raises(TransportError, match="does not belong"):
        CurveConfig(other, sec, {0: other})
    with pytest.raises(TransportError, match="same public key"):
        CurveConfig(pub, sec, {0: pub, 1: pub})
    cfg = CurveConfig(pub, sec, {0: pub})
    assert sec.decode() not in repr(cfg)
    eps = {0: "tcp://127.0.0.1:1", 1: "tcp://127.0.0.1:2"}
    with pytest.raises(TransportError, match="no public key for neighbour 1"):
        Transport(0, eps, [1], curve=cfg)


def test_authenticator_thread_stops_on_close(net):
    make, *_ = net
    before = {t.ident for t in threading.enumerate()}
    t0 = make(0, [1])
    t0.close(send_bye=False)
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]


# --------------------------------------------------------------------------- keys

def _all_secrets(keys_dir: Path) -> list[str]:
    out = []
    for p in keys_dir.glob("*.key_secret"):
        for line in p.read_text().splitlines():
            if line.strip().startswith("secret-key"):
                out.append(line.split("=", 1)[1].strip().strip('"'))
    return out


def test_keys_command_writes_public_keys_only_into_the_bootstrap(tmp_path):
    topo = tmp_path / "ring3.json"
    topo.write_text(ring(3).to_json())
    boot, kdir = tmp_path / "peers.json", tmp_path / "keys"
    res = CliRunner().invoke(main, ["keys", "--topology", str(topo), "--bootstrap", str(boot),
                                    "--keys-dir", str(kdir), "--base-port", "7000"])
    assert res.exit_code == 0, res.output
    doc = json.loads(boot.read_text())
    assert doc["peers"]["2"]["endpoint"] == "tcp://127.0.0.1:7002"
    secrets_ = _all_secrets(kdir)
    assert len(secrets_) == 3
    text = boot.read_text()
    assert not any(s in text for s in secrets_) and "secret" not in text
    assert not any(s in res.output for s in secrets_)
    for i in range(3):
        sp = secret_key_path(kdir, i)
        assert stat.S_IMODE(sp.stat().st_mode) == 0o600
        assert "secret" not in (kdir / f"peer-{i}.key").read_text()
        assert zmq.auth.load_certificate(sp)[0].decode() == doc["peers"][str(i)]["public_key"]
        cfg = load_curve(kdir, boot, i, [0, 1, 2])
        assert cfg.peer_keys[i] == cfg.public_key
    # re-running keeps the keys; endpoints written by hand are kept
    doc["peers"]["1"]["endpoint"] = "tcp://10.0.0.5:6000"
    boot.write_text(json.dumps(doc))
    make_keys([0, 1, 2], kdir, boot)
    again = json.loads(boot.read_text())
    assert again["peers"]["1"] == doc["peers"]["1"] and sorted(_all_secrets(kdir)) == sorted(secrets_)


def test_keys_errors_are_one_line(tmp_path):
    boot, kdir = tmp_path / "peers.json", tmp_path / "keys"
    make_keys([0, 1], kdir, boot, base_port=7100)
    doc = json.loads(boot.read_text())
    # a secret key that does not match the bootstrap's public key
    doc["peers"]["0"]["public_key"], doc["peers"]["1"]["public_key"] = doc["peers"]["1"]["public_key"], doc["peers"]["0"]["public_key"]
    boot.write_text(json.dumps(doc))
    with pytest.raises(KeysError, match="does not match peer 0's public_key"):
        load_curve(kdir, boot, 0)
    # a bootstrap entry without public_key
    del doc["peers"]["1"]["public_key"]
    boot.write_text(json.dumps(doc))
    with pytest.raises(KeysError, match="peer 1 has no public_key"):
        load_curve(kdir, boot, 0)
    make_keys([0, 1], kdir, boot)  # repairs the file from the keys on disk
    load_curve(kdir, boot, 0)
    # a missing secret key, one readable by others, no bootstrap file
    with pytest.raises(KeysError, match="secret key of peer 1 not found"):
        load_curve(tmp_path / "elsewhere", boot, 1)
    os.chmod(secret_key_path(kdir, 1), 0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        load_curve(kdir, boot, 1)
    with pytest.raises(KeysError, match="--bootstrap"):
        load_curve(kdir, None, 1)
    assert issubclass(KeysError, ValueError)


def test_start_secure_without_bootstrap_is_a_user_error(tmp_path):
    topo = tmp_path / "ring3.json"
    topo.write_text(ring(3).to_json())
    res = CliRunner().invoke(main, ["start", "--id", "0", "--neighbors", str(topo), "--secure",
                                    "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: peer 0: --secure needs --bootstrap"), res.output


def test_passthrough_sends_bool_flags_bare():
    assert _passthrough({"secure": True, "keys_dir": "k", "rounds": 1, "codec": None}) == \
        ["--secure", "--keys-dir", "k", "--rounds", "1"]
    assert _passthrough({"secure": False}) == []


# --------------------------------------------------------------------------- end to end

def test_secure_network_of_real_peers(deca_cache, tmp_path):
    topo = tmp_path / "ring3.json"
    topo.write_text(ring(3).to_json())
    base = free_base_port(3)
    boot, kdir, run_dir = tmp_path / "peers.json", tmp_path / "keys", tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(deca_peer_cmd("keys", "--topology", topo, "--bootstrap", boot, "--keys-dir", kdir,
                                 "--base-port", base), check=True, env=env, cwd=tmp_path, capture_output=True, timeout=60)
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo, "--bootstrap", boot, "--secure",
                                            "--keys-dir", kdir, "--run-dir", run_dir, "--rounds", 1, "--inner-steps", 2,
                                            "--threads", 1, "--set", "train_per_task=100", "--set", "eval_per_task=3"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
             for i in range(3)]
    # meanwhile an outsider with a keypair of its own (not in the bootstrap file) keeps knocking on peer 0
    peer0 = json.loads(boot.read_text())["peers"]["0"]
    stop = threading.Event()

    def outsider():
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        pub, sec = zmq.curve_keypair()
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.CURVE_PUBLICKEY, pub)
        s.setsockopt(zmq.CURVE_SECRETKEY, sec)
        s.setsockopt(zmq.CURVE_SERVERKEY, peer0["public_key"].encode())
        s.setsockopt(zmq.ROUTING_ID, b"peer-1")
        s.connect(peer0["endpoint"])
        hello = _frames(wire.Message("hello", src=1, inc=1))
        while not stop.wait(0.5):
            try:
                s.send_multipart(hello, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        s.close(linger=0)
        ctx.term()

    knock = threading.Thread(target=outsider, daemon=True)
    knock.start()
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append(out.decode(errors="replace"))
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        knock.join(5)
    assert [p.returncode for p in procs] == [0] * 3, "\n".join(o[-2000:] for o in outs)
    # peer 0 counted the outsider's refused handshakes, said so once, and ran to the end as if nothing happened
    final0 = [json.loads(line) for line in (run_dir / "peer-0" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final0["event"] == "final" and final0["rejected_handshakes"] >= 1, final0
    assert final0["handshake_failures"].get("auth", 0) >= 1 and not final0["dropped"], final0
    assert outs[0].count("refused a connection to") == 1, outs[0][-3000:]
    assert "not in the bootstrap file" in outs[0]
    secrets_ = _all_secrets(kdir)
    assert len(secrets_) == 3
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        assert not any(s.encode() in data for s in secrets_), f"secret key in {f}"
    assert not any(s in o for s in secrets_ for o in outs)
    for i in range(3):  # the peers really exchanged blocks over the encrypted links
        recs = [json.loads(line) for line in (run_dir / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in recs if r["event"] == "final"]
        assert final and final[-1]["bytes_recv"] > 0
        exchanges = [r for r in recs if r["event"] == "step" and "missing" in r]  # (the hellos alone count bytes too)
        assert exchanges and all(r["missing"] == [] for r in exchanges), [r["missing"] for r in exchanges]
