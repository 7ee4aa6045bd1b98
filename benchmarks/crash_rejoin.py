"""Scripted demo: kill -9 one peer of eight mid-round, restart it with the same command, watch it rejoin.

    .venv/bin/python benchmarks/crash_rejoin.py [--victim 3] [--exchange-timeout 5]

Real `deca-peer start` processes on 127.0.0.1 (ring8, embedded model and data). Writes the timeline to
benchmarks/results/crash_rejoin.md (and a plot of the victim's and its neighbours' loss), printing the
detection time last.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from deca_p2p.bootstrap import free_base_port  # noqa: E402
from deca_p2p.metrics import records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victim", type=int, default=3)
    ap.add_argument("--exchange-timeout", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=16)
    args = ap.parse_args()
    topo = REPO / "topologies" / "ring8.json"
    run_dir = Path(tempfile.mkdtemp(prefix="crash-rejoin-")) / "run"
    base = free_base_port(8)
    common = ["--neighbors", str(topo), "--run-dir", str(run_dir), "--base-port", str(base), "--threads", "1",
              "--rounds", str(args.rounds), "--inner-steps", str(args.inner_steps),
              "--exchange-timeout", str(args.exchange_timeout), "--set", "train_per_task=500"]

    def start(i):
        log = open(run_dir.parent / f"peer-{i}.out", "a")
        return subprocess.Popen([sys.executable, "-m", "deca_p2p.cli", "start", "--id", str(i), *common],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    t0 = time.time()
    procs = {i: start(i) for i in range(8)}
    v = args.victim
    n_blocks = None
    while True:  # kill it mid-round: half-way through the second block of round 1
        steps = records(run_dir, v, "step")
        if n_blocks is None and records(run_dir, v, "start"):
            n_blocks = records(run_dir, v, "start")[0]["n_blocks"]
        if n_blocks and steps and steps[-1]["istep"] >= (n_blocks + 1) * args.inner_steps + args.inner_steps // 2:
            break
        if time.time() - t0 > 600:
            raise SystemExit("the run did not get going")
        time.sleep(0.1)
    procs[v].send_signal(signal.SIGKILL)
    procs[v].wait()
    killed = time.time()
    last = records(run_dir, v, "step")[-1]
    time.sleep(2 * args.exchange_timeout)
    restarted = time.time()
    procs[v] = start(v)  # the same command
    codes = {i: p.wait(timeout=1800) for i, p in procs.items()}
    wall = time.time() - t0

    nbrs = [(v - 1) % 8, (v + 1) % 8]
    detect = {}
    for j in nbrs:
        miss = [r for r in records(run_dir, j, "step") if v in (r.get("missing") or []) and r["time"] > killed]
        detect[j] = miss[0]["time"] - killed if miss else None
    resume = records(run_dir, v, "resume")[0]
    rejoin = records(run_dir, v, "rejoin")[0]
    first_back = next((r for r in records(run_dir, v, "step") if r["time"] > restarted and not r.get("missing")), None)
    finals = {i: records(run_dir, i, "final")[-1] for i in range(8)}
    others = [finals[i]["eval_loss"] for i in range(8) if i != v]
    lines = [
        "# Crash and rejoin: kill -9 one peer of eight mid-round",
        "",
        f"Command: `.venv/bin/python benchmarks/crash_rejoin.py --victim {v} --exchange-timeout {args.exchange_timeout} "
        f"--rounds {args.rounds} --inner-steps {args.inner_steps}` (ring8, embedded model and data, 2 cores).",
        "",
        "| t (s) | event |",
        "|---|---|",
        "| 0.0 | 8 peers started |",
        f"| {killed - t0:.1f} | peer {v} killed with SIGKILL at round {last['round']}, block {last['block']}, "
        f"step {last['step']} (inner step {last['istep']}) |",
    ]
    for j in nbrs:
        d = detect[j]
        lines.append(f"| {killed - t0 + (d or 0):.1f} | neighbour {j} mixes without peer {v} "
                     f"({'%.1f s after the kill' % d if d is not None else 'never'}; exchange timeout {args.exchange_timeout} s) |")
    lines += [
        f"| {restarted - t0:.1f} | peer {v} restarted with the same command (new incarnation) |",
        f"| | it resumed from its checkpoint after activation {resume['activation']} and rejoined at activation "
        f"{rejoin['activation']}, step {rejoin['step']}: {rejoin['missed_activations']} activation(s) "
        f"({rejoin['missed_activations'] / n_blocks:.2f} rounds) missed |",
    ]
    if first_back:
        lines.append(f"| {first_back['time'] - t0:.1f} | first exchange of peer {v} with both neighbours again |")
    lines += [
        f"| {wall:.1f} | run complete; exit codes {sorted(set(codes.values()))} |",
        "",
        f"Final eval loss of the rejoined peer {v}: {finals[v]['eval_loss']:.3f} (acc {finals[v]['acc']:.3f}); "
        f"the other seven: mean {sum(others) / 7:.3f}, range {min(others):.3f}–{max(others):.3f}.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crash_rejoin.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in [v, *nbrs]:
        pts = [(r["time"] - t0, r["loss"]) for r in records(run_dir, i, "step")]
        ax.plot(*zip(*pts), lw=1, label=f"peer {i}" + (" (killed)" if i == v else ""))
    ax.axvline(killed - t0, color="red", ls="--", lw=1, label="kill -9")
    ax.axvline(restarted - t0, color="green", ls="--", lw=1, label="restart")
    ax.set_xlabel("seconds")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "crash_rejoin.png", dpi=110)
    print("\n".join(lines))
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    print(f"detection time: {max(d for d in detect.values() if d is not None):.1f} s "
          f"(exchange timeout {args.exchange_timeout} s)")


if __name__ == "__main__":
    main()
