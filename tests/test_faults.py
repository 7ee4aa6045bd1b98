"""Faults with real processes: kill -9 and rejoin, stragglers, and kills during a checkpoint save."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.checkpoint import latest
from deca_p2p.metrics import records

FAST = ["--rounds", 2, "--inner-steps", 8, "--threads", 1, "--set", "train_per_task=100", "--set", "eval_per_task=3",
        "--exchange-timeout", 3, "--hello-timeout", 60]


def _start(i, topo, run_dir, base, *extra):
    return subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo, "--run-dir", run_dir,
                                          "--base-port", base, *FAST, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir.parent)


def _kill_after_first_checkpoint(procs, run_dir, i, deadline) -> None:
    """SIGKILL peer I a second after its first checkpoint: mid-round, with something to resume from."""
    while latest(run_dir / f"peer-{i}" / "checkpoint") is None:
        assert time.time() < deadline and procs[i].poll() is None
        time.sleep(0.2)
    time.sleep(1.0)
    procs[i].send_signal(signal.SIGKILL)
    procs[i].wait()


def _activation(ckpt) -> int:
    """The activation a checkpoint directory holds (ckpt-a<activation>-<ns>; -1 for none)."""
    return -1 if ckpt is None else int(ckpt.name.split("-")[1][1:])


def test_kill_9_and_rejoin(deca_cache, tmp_path):
    topo, run_dir, base = REPO / "topologies" / "ring4.json", tmp_path / "run", free_base_port(4)
    procs = {i: _start(i, topo, run_dir, base, "--set", "rounds=6") for i in range(4)}
    deadline = time.time() + 180
    _kill_after_first_checkpoint(procs, run_dir, 1, deadline)
    killed_at = time.time()
    # the neighbours carry on without it: restart it once they are two activations past its checkpoint, so that
    # its rejoin has activations to skip (it must pick up where the network is, not where it stopped)
    done = _activation(latest(run_dir / "peer-1" / "checkpoint"))
    while _activation(latest(run_dir / "peer-0" / "checkpoint")) < done + 2:
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.2)
    procs[1] = _start(1, topo, run_dir, base, "--set", "rounds=6")  # the same command
    outs = {i: p.communicate(timeout=240)[0] for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {i: o[-1500:] for i, o in outs.items()}
    # the neighbours noticed, within the exchange timeout, and went on with renormalized weights
    for j in (0, 2):
        gone = [r for r in records(run_dir, j, "step") if 1 in (r.get("missing") or []) and r["time"] > killed_at]
        assert gone, f"peer {j} never mixed without peer 1"
        assert gone[0]["time"] - killed_at < 3.0 + 5.0
    resumed = records(run_dir, 1, "resume")
    rejoined = records(run_dir, 1, "rejoin")
    assert resumed and rejoined and rejoined[0]["missed_activations"] >= 1, (resumed, rejoined)
    assert rejoined[0]["activation"] >= done + 2
    # after the rejoin it exchanged with its neighbours again (full blocks first) and everyone finished
    after = [r for r in records(run_dir, 1, "step") if r["time"] > killed_at]
    assert after and any(not r.get("missing") for r in after)
    for i in range(4):
        assert records(run_dir, i, "final")
    incs = {r["inc"] for r in records(run_dir, 1, "start")}
    assert len(incs) == 2  # a new incarnation


@pytest.mark.integration
def test_a_restarted_peer_with_dp_counts_its_releases_on(deca_cache, tmp_path):
    """Privacy accounting must not undercount: a peer killed mid-run and restarted counts its DP releases on from
    its log (plus one it may have sent unlogged), so its ε goes on growing from where it was, not from zero."""
    topo, run_dir, base = REPO / "topologies" / "ring4.json", tmp_path / "run", free_base_port(4)
    dp = ["--set", "rounds=4", "--dp-clip", "0.5", "--dp-noise", "0.05"]
    procs = {i: _start(i, topo, run_dir, base, *dp) for i in range(4)}
    _kill_after_first_checkpoint(procs, run_dir, 1, time.time() + 180)
    before = [r for r in records(run_dir, 1, "step") if r.get("dp_releases")]
    assert before
    procs[1] = _start(1, topo, run_dir, base, *dp)
    outs = {i: p.communicate(timeout=240)[0] for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {i: o[-1500:] for i, o in outs.items()}
    incs = [r["inc"] for r in records(run_dir, 1, "start")]
    assert len(incs) == 2
    after = [r for r in records(run_dir, 1, "step") if r.get("dp_releases") and r["time"] > before[-1]["time"]]
    assert after, "the restarted peer released nothing"
    assert after[0]["dp_releases"] >= before[-1]["dp_releases"] + 2  # logged, one maybe unlogged, then its own
    assert after[0]["dp_epsilon"] > before[-1]["dp_epsilon"]
    final = records(run_dir, 1, "final")[-1]
    assert final["dp_releases"] == after[-1]["dp_releases"] and final["dp_epsilon"] >= after[-1]["dp_epsilon"]


@pytest.mark.integration
def test_a_whole_network_restarted_picks_up_without_waiting_out_the_timeout(deca_cache, tmp_path):
    """Every peer restarts at once (a rerun with more rounds, or after the whole network went down): none has an
    exchange of its own to tell the others, so each tells its resume point; without that every catch-up only ends
    at the exchange timeout (network_seq None) and the peers go on from wherever they stopped, uninformed."""
    topo, run_dir, base = REPO / "topologies" / "ring4.json", tmp_path / "run", free_base_port(4)
    for rounds in (1, 2):  # the same command twice: the second resumes every peer from its final checkpoint
        procs = {i: _start(i, topo, run_dir, base, "--set", f"rounds={rounds}") for i in range(4)}
        outs = {i: p.communicate(timeout=240)[0] for i, p in procs.items()}
        assert all(p.returncode == 0 for p in procs.values()), {i: o[-1500:] for i, o in outs.items()}
    for i in range(4):
        rejoined = records(run_dir, i, "rejoin")
        assert len(rejoined) == 1 and rejoined[0]["network_seq"] is not None, rejoined
        assert rejoined[0]["activation"] == 4 and rejoined[0]["missed_activations"] == 0  # round 1's first block
        assert [r["round"] for r in records(run_dir, i, "step")][-1] == 1


@pytest.mark.integration
def test_two_neighbours_restarted_together_start_at_the_same_exchange(deca_cache, tmp_path):
    """On the path 0-1-2-3, peers 2 and 3 go down together and come back while 0 and 1 run on. Peer 2 hears
    where the network is from 1 and jumps there; peer 3 hears only peer 2, first its checkpoint position (marked
    resuming), so it must wait for where 2 really starts: else it starts activations behind 2 and the two never
    mix again (each drops the other's blocks as stale or too far ahead, and waits out the timeout)."""
    topo, run_dir, base = tmp_path / "path4.json", tmp_path / "run", free_base_port(4)
    topo.write_text(json.dumps({"name": "path4", "nodes": [0, 1, 2, 3], "edges": [[0, 1], [1, 2], [2, 3]]}))
    procs = {i: _start(i, topo, run_dir, base, "--set", "rounds=6") for i in range(4)}
    deadline = time.time() + 180
    _kill_after_first_checkpoint(procs, run_dir, 3, deadline)
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait()
    done = max(_activation(latest(run_dir / f"peer-{i}" / "checkpoint")) for i in (2, 3))
    while _activation(latest(run_dir / "peer-0" / "checkpoint")) < done + 2:
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.2)
    t_restart = time.time()
    for i in (2, 3):
        procs[i] = _start(i, topo, run_dir, base, "--set", "rounds=6")
    outs = {i: p.communicate(timeout=240)[0] for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {i: o[-1500:] for i, o in outs.items()}
    rejoined = {i: records(run_dir, i, "rejoin") for i in (2, 3)}
    assert all(len(r) == 1 for r in rejoined.values()), rejoined
    assert rejoined[2][0]["activation"] >= done + 2  # it heard peer 1
    assert (rejoined[3][0]["activation"], rejoined[3][0]["step"]) == (rejoined[2][0]["activation"],
                                                                        rejoined[2][0]["step"]), rejoined
    after = [r for r in records(run_dir, 3, "step") if r["time"] > t_restart and "missing" in r]
    assert after and sum(2 not in r["missing"] for r in after) >= len(after) - 1, after  # 3 mixes with 2 again


def test_straggler_is_waited_for_then_left_out(deca_cache, tmp_path):
    topo, run_dir, base = REPO / "topologies" / "ring4.json", tmp_path / "run", free_base_port(4)
    extra = {2: ["--slowdown", 40]}  # ~2 s a step, against a 1 s exchange timeout
    procs = {i: _start(i, topo, run_dir, base, "--set", "rounds=1", "--set", "inner_steps=2", "--exchange-timeout", 1,
                       *extra.get(i, [])) for i in range(4)}
    outs = {i: p.communicate(timeout=240)[0] for i, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), {i: o[-1500:] for i, o in outs.items()}
    steps = records(run_dir, 1, "step")
    left_out = [r for r in steps if 2 in (r.get("missing") or [])]
    waited = [r for r in steps if r.get("wait_s", 0) > 0.9]
    assert left_out, "the straggler was never left out"
    assert waited, "nobody waited up to the timeout for the straggler"
    assert all(r["wait_s"] < 1.0 + 1.5 for r in steps)  # never waits much past the timeout


_SAVER = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from deca_p2p.checkpoint import save_atomic
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2))
layers = [[n for n, _ in m.named_parameters() if n.startswith(f"model.layers.{i}.")] for i in (0, 1)]
sharded = sys.argv[2] == "sharded"
with torch.no_grad():
    for p in m.parameters():
        p.fill_(-1)
print("ready", flush=True)
k = 0
while True:  # one file: every tensor holds k; sharded: as a peer, save k changes layer k % 2 alone, to k
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n in (layers[k % 2] if sharded else params):
            params[n].fill_(k)
    save_atomic(m, None, sys.argv[1], tag=str(k), groups=layers if sharded else None,
                changed=layers[k % 2] if sharded else None)
    k += 1
"""


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("layout", ["one-file", "sharded"])
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path, layout):
    from deca_p2p.checkpoint import read_weights, save_atomic

    root = tmp_path / "ckpt"
    for trial in range(4):
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(root), layout], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5 + 0.37 * trial)  # somewhere in the middle of a save
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = latest(root)
        assert ckpt is not None
        k = int(ckpt.name.split("-")[1])
        value = {n: {float(x) for x in t.flatten()} for n, t in read_weights(ckpt).items()}
        assert all(len(v) == 1 for v in value.values()), "a torn tensor"
        value = {n: v.pop() for n, v in value.items()}
        if layout == "one-file":
            assert set(value.values()) == {k}  # one whole checkpoint, not a mix of two saves
        else:  # save k: layer k % 2 at k, the other at k - 1 (-1 before its first save), the rest never changed
            want = {k % 2: k, 1 - k % 2: k - 1 if k else -1}
            for n, v in value.items():
                i = int(n.split(".")[2]) if n.startswith("model.layers.") else None
                assert v == (-1 if i is None else want[i]), (n, v, k)
    # a kill leaves its temp directory (holding links to the shards it reused): a process's first save into the root
    # removes what earlier ones left
    (root / ".tmp-left").mkdir(exist_ok=True)
    os.link(next(latest(root).glob("*.safetensors")), root / ".tmp-left" / "held.safetensors")
    (root / ".latest-1").unlink(missing_ok=True)
    (root / ".latest-1").symlink_to(latest(root).name)
    save_atomic(_tiny_llama(), None, root, tag="x")
    assert sorted(p.name for p in root.iterdir()) == sorted(["latest", latest(root).name])

