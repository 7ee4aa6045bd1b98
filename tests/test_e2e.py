"""End to end: real `deca-peer start` OS processes over ZeroMQ on 127.0.0.1 reproduce the in-process reference."""
import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, deca_peer_cmd, free_base_port, max_diff_to_simulation
from deca_p2p import peer_env
from deca_p2p.checkpoint import latest, read_weights
from deca_p2p.timeslice import current_slice_ms

SMALL = {"rounds": 1, "inner_steps": 3, "batch_size": 8, "train_per_task": 100, "eval_per_task": 3,
         "threads": 1, "seed": 3, "lr": 3e-3, "codec": "raw"}


def _cli_args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}" if k in ("rounds", "inner_steps", "batch_size", "threads", "seed", "lr", "codec")
                else "--set", str(v) if k in ("rounds", "inner_steps", "batch_size", "threads", "seed", "lr", "codec")
                else f"{k}={v}"]
    return out


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.parametrize("extra", [{}, {"overlap": "true"}], ids=["blocking", "overlap"])
def test_network_reproduces_in_process_simulation(deca_cache, tmp_path, extra):
    """Also with --overlap: the blocks of a step travel while its gradient is computed, and the mix lands after it;
    simulate does the same maths in the same order."""
    cfg = {**SMALL, **extra}
    topo_path = REPO / "topologies" / "ring4.json"
    base = free_base_port(4)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo_path, "--run-dir", run_dir,
                                            "--base-port", base, *_cli_args(cfg)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
             for i in range(4)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        outs.append(out.decode(errors="replace"))
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outs)
    # `start` leaves with os._exit once its files are closed: every metrics file is whole, ending with `final`
    for i in range(4):
        assert json.loads((run_dir / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "final"
    # where the CPU went (cpu_parts.py): every part of a training step was timed, within the thread's and process's CPU
    fin = json.loads((run_dir / "peer-0" / "metrics.jsonl").read_text().splitlines()[-1])
    parts = fin["cpu_parts"]
    assert {"step", "send", "receive", "mix", "apply", "activate", "checkpoint", "evaluate", "log"} <= set(parts)
    assert parts["step"] > 0 and parts["mix"] > 0 and parts["send"] > 0
    assert sum(parts.values()) <= fin["cpu_main_s"] + 0.01 <= fin["cpu_process_s"] + 0.02

    worst = max_diff_to_simulation(run_dir, topo_path, cfg)
    assert worst <= 1e-6, worst
    if extra:  # and --overlap really ran: one-step-delayed gossip is another computation than the blocking one
        assert max_diff_to_simulation(run_dir, topo_path, SMALL) > 1e-5
    # `start` re-executed itself with huge-page malloc (peer_env.py) unless the environment already chose
    start = next(r for r in map(json.loads, (run_dir / "peer-1" / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "start")
    want = os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1" if peer_env._glibc_has_hugetlb() else None)
    assert start["glibc_tunables"] == want
    # the training thread asked for a 30 ms time slice (timeslice.py) where the kernel has custom slices
    assert start["time_slice_ms"] == (None if current_slice_ms() is None else 30.0)
    # and, after the barrier, ZeroMQ's I/O thread, its one context's only one (no link of ring4 is emulated)
    ready = next(r for r in map(json.loads, (run_dir / "peer-1" / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "ready")
    assert ready["io_time_slice_ms"] == ([] if current_slice_ms() is None else [30.0])
    # each save after the first rewrote the shards of the blocks trained since (checkpoint_reuse.py): the final
    # checkpoint is block-sharded, and it equals simulate's model (above)
    assert (latest(run_dir / "peer-0" / "checkpoint") / "model.safetensors.index.json").is_file()
    # and each peer's read-back of its last checkpoint found it exact (peer._verify_last_checkpoint)
    assert not any('"checkpoint_repaired"' in (run_dir / f"peer-{i}" / "metrics.jsonl").read_text() for i in range(4))
    # the network moved the weights: peers differ from the initial model and from each other
    a = read_weights(latest(run_dir / "peer-0" / "checkpoint"))
    b = read_weights(latest(run_dir / "peer-2" / "checkpoint"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_hello_barrier_names_the_peer_that_never_started(deca_cache, tmp_path):
    base = free_base_port(4)
    p = subprocess.run(deca_peer_cmd("start", "--id", 0, "--neighbors", REPO / "topologies" / "ring4.json",
                                     "--run-dir", tmp_path / "run", "--base-port", base, "--hello-timeout", 3,
                                     *_cli_args(SMALL)),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "hello" in line and "1" in line and "3" in line, line
