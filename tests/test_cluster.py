"""`deca-peer cluster`: real peer processes; Ctrl-C stops them all cleanly, each with a final checkpoint."""
import json
import signal
import subprocess
import time

import psutil

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.checkpoint import latest


def _steps_logged(run_dir, peer):
    f = run_dir / f"peer-{peer}" / "metrics.jsonl"
    if not f.is_file():
        return 0
    return sum(1 for line in f.read_text().splitlines() if '"event": "step"' in line)


def test_ctrl_c_stops_every_peer_with_a_checkpoint_and_leaves_no_process(deca_cache, tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.Popen(deca_peer_cmd("cluster", "--topology", REPO / "topologies" / "ring4.json", "--no-live",
                                       "--run-dir", run_dir, "--base-port", free_base_port(4), "--rounds", 50,
                                       "--set", "train_per_task=100", "--set", "eval_per_task=3"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline and not all(_steps_logged(run_dir, i) >= 3 for i in range(4)):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.5)
    children = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert len(children) >= 4
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out[-3000:]
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    for i in range(4):
        assert latest(run_dir / f"peer-{i}" / "checkpoint") is not None
        final = [json.loads(x) for x in (run_dir / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()
                 if '"event": "final"' in x]
        assert final and final[0]["stopped"] is True
    assert "eval loss" in out and (run_dir / "plots" / "loss.png").is_file()
    # the peers share the cluster's one eval file: only the first scores the starting model (the report's start row)
    initial = [i for i in range(4) if '"activation": -1' in (run_dir / f"peer-{i}" / "metrics.jsonl").read_text()]
    assert initial == [0] and "start" in out
