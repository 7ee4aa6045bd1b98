"""Conformance: a peer written from PROTOCOL.md alone (tests/conformance_peer.py: pyzmq, msgpack, numpy and the
standard library, nothing of deca_p2p) joins a ring of real `deca-peer start` processes as a pure-gossip peer, and
the real peers mix its blocks at every exchange.

ring4: peers 0, 1, 2 are real; peer 3 (neighbours 0 and 2) is the independent one. `--gossip-every 2` with 3 inner
steps exercises both exchange rules (every c-th step and the last step of an activation); `random` block order
exercises the SHA-256 generator over two rounds; codecs differ per peer (0: int8, 1: raw, 2: bf16; the independent
peer sends int8), so both sides decode each other's codecs and keep delta chains with a lossy codec.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port

HERE = Path(__file__).resolve().parent
PEER = HERE / "conformance_peer.py"
ROUNDS, INNER, EVERY, SEED = 2, 3, 2, 11
ALLOWED_IMPORTS = {"__future__", "argparse", "hashlib", "json", "math", "os", "re", "struct", "sys", "time",
                   "collections", "msgpack", "numpy", "zmq"}


def test_the_independent_peer_uses_nothing_of_deca_p2p():
    tree = ast.parse(PEER.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("__import__", "exec", "eval"), node.func.id
        elif isinstance(node, ast.Attribute):
            assert node.attr != "import_module"
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    assert "deca_p2p" not in imported


def _run_ring(tmp_path: Path):
    """Three real peers and the independent one on ring4; returns (procs, outputs, run_dir, out3)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    topo = REPO / "topologies" / "ring4.json"
    base = free_base_port(4)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    common = ["--rounds", ROUNDS, "--inner-steps", INNER, "--gossip-every", EVERY, "--block-order", "random",
              "--seed", SEED]
    codecs = {0: "int8", 1: "raw", 2: "bf16"}
    procs = {i: subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo, "--run-dir", run_dir,
                                               "--base-port", base, *common, "--codec", codecs[i], "--threads", 1,
                                               "--batch-size", 8, "--robust", "none", "--exchange-timeout", 30,
                                               "--hello-timeout", 120, "--set", "train_per_task=100",
                                               "--set", "eval_per_task=3"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
             for i in codecs}
    out3 = tmp_path / "peer3.json"
    # no PYTHONPATH to the repository: nothing of deca_p2p on the independent peer's path but the installed package
    ienv = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, PEER, "--id", 3, "--topology", topo, "--base-port", base, "--model",
           REPO / "deca_p2p" / "base_model", *common, "--codec", "int8", "--exchange-timeout", 30,
           "--hello-timeout", 120, "--out", out3]
    procs[3] = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ienv,
                                cwd=tmp_path)
    outs = {}
    try:
        for i, p in procs.items():
            out, _ = p.communicate(timeout=500)
            outs[i] = out.decode(errors="replace")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, outs, run_dir, out3


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_an_independent_peer_joins_a_ring_of_real_peers(deca_cache, tmp_path):
    procs, outs, run_dir, out3 = _run_ring(tmp_path)
    assert {i: p.returncode for i, p in procs.items()} == {i: 0 for i in range(4)}, \
        "\n".join(f"--- peer {i}\n{o[-2500:]}" for i, o in outs.items())

    ind = json.loads(out3.read_text())
    assert ind["deca_p2p_loaded"] == []
    n_blocks, n_ex = 4, 2  # the embedded model's 4 layers; exchange steps 1 and 2 (the last)
    total = ROUNDS * n_blocks * n_ex
    recs = {i: [json.loads(line) for line in (run_dir / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()]
            for i in range(3)}
    # the handshake: the independent peer's fingerprint, computed from PROTOCOL.md §6.1.1, is the real peers' own
    for i in range(3):
        ready = [r for r in recs[i] if r["event"] == "ready"]
        assert ready and ready[0]["config_digest"] == ind["digest"]
    # the same schedule (§7): real peers' exchange records and the independent peer's exchanges, seq for seq
    ours = [(e["seq"], e["round"], e["block"], e["step"]) for e in ind["exchanges"]]
    assert [e[0] for e in ours] == list(range(total))
    assert [e[3] for e in ours] == [1, 2] * (ROUNDS * n_blocks)
    assert ind["orders"] != [list(range(n_blocks))] * ROUNDS  # random order really is another order
    for i in (0, 2):  # peer 3's neighbours
        steps = [r for r in recs[i] if r["event"] == "step" and "mixed" in r]
        assert [(r["seq"], r["round"], r["block"], r["step"]) for r in steps] == ours
        for r in steps:  # every exchange mixed the independent peer's block (and the other neighbour's)
            assert r["mixed"] == sorted({1, 3}) and r["missing"] == [], r
        final = [r for r in recs[i] if r["event"] == "final"][-1]
        assert final["dropped"] == {} and final["rejected_handshakes"] == 0, final
    # and the independent peer mixed both neighbours at every exchange, dropping nothing
    assert all(e["arrived"] == [0, 2] and e["missing"] == [] for e in ind["exchanges"]), ind["exchanges"]
    assert ind["dropped"] == {}, ind["dropped"]
    assert ind["received"].get("block/full", 0) == 2 * ROUNDS * n_blocks  # one full block per neighbour and activation
    assert ind["received"].get("bye", 0) >= 2
