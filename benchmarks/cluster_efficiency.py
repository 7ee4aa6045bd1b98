"""How close does `make cluster` come to the ideal speed-up on this machine's cores?

Runs the main job as `make cluster` does (`deca-peer cluster --topology topologies/ring8.json`, every default: 8 real
peer processes, 1 torch thread each), once blocking and once with `--overlap`, and the same run in one process
(`deca-peer simulate`, 1 thread), one after the other. Efficiency = (simulate wall / cores) / cluster wall: 1.0 would
mean the 8 processes use every core all the time with no overhead over the one-process reference. Also reported per
peer, from the metrics: compute, waiting and everything else (start-up, evaluation, checkpoints).

    .venv/bin/python benchmarks/cluster_efficiency.py [--rounds N]

Writes benchmarks/results/cluster_efficiency.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine_facts

from deca_p2p.bootstrap import free_base_port
from deca_p2p.metrics import read_metrics

TOPO = ROOT / "topologies" / "ring8.json"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall


def per_peer(run_dir: Path) -> dict:
    data = read_metrics(run_dir)
    comp, wait, span = [], [], []
    for recs in data.values():
        steps = [r for r in recs if r.get("event") == "step"]
        comp.append(sum(r["compute_s"] for r in steps))
        wait.append(sum(r.get("wait_s") or 0.0 for r in steps))
        span.append(steps[-1]["time"] - steps[0]["time"])
    return {"compute": statistics.mean(comp), "wait": statistics.mean(wait), "train_span": statistics.mean(span)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="fewer rounds than the default (a quicker, rougher measurement)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    extra = ["--rounds", str(a.rounds)] if a.rounds else []
    deca = [sys.executable, "-m", "deca_p2p.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="cluster-eff-"))
    load0 = os.getloadavg()[0]
    rows = {}
    for name, flags in (("cluster", []), ("cluster --overlap", ["--overlap"])):
        run_dir = tmp / name.replace(" ", "_")
        wall = timed(deca + ["cluster", "--topology", str(TOPO), "--no-live", "--run-dir", str(run_dir),
                             "--base-port", str(free_base_port(8)), *extra, *flags])
        rows[name] = {"wall": wall, **per_peer(run_dir)}
        print(f"{name}: {wall:.1f} s", flush=True)
    sim = timed(deca + ["simulate", "--topology", str(TOPO), "--threads", "1", *extra])
    print(f"simulate: {sim:.1f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ".venv/bin/python benchmarks/cluster_efficiency.py" + (f" --rounds {a.rounds}" if a.rounds else "")
    L = ["# make cluster against the ideal speed-up", "", f"Command: `{cmd}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.",
         "", f"ring8, every `make cluster` default{' but ' + ' '.join(extra) if extra else ''}; `deca-peer simulate` "
         f"of the same run in one process with 1 thread: **{sim:.1f} s**; {cores} cores, so the ideal cluster wall is "
         f"{sim / cores:.1f} s. Target (issue 12): efficiency >= 0.8 (it was 0.59).", "",
         "| run | wall s | efficiency (simulate / cores / wall) | per peer: compute s | waiting s | first to last step s |"
         " of which neither s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        L.append(f"| `{name}` | {r['wall']:.1f} | **{sim / cores / r['wall']:.2f}** | {r['compute']:.1f} | "
                 f"{r['wait']:.1f} | {r['train_span']:.1f} | {r['train_span'] - r['compute'] - r['wait']:.1f} |")
    L += ["", "Wall times include everything the command does: start-up (model load, hello barrier), training, the "
          "evaluations and checkpoints, and (cluster) the average model's evaluation. *Neither*: between the first "
          "and the last step, time in neither compute nor an exchange (evaluations, checkpoints, logging, the mix's "
          "application). With `--overlap`, waiting is only what the gradient did not hide.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster_efficiency.md").write_text("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
