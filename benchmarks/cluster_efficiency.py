"""How close does `make cluster` come to the ideal speed-up on this machine's cores?

Runs the main job as `make cluster` does (`deca-peer cluster --topology topologies/ring8.json`, every default: 8 real
peer processes, 1 torch thread each), once blocking, once with `--overlap` and once blocking with the kernel's default
CPU time slice (`--time-slice-ms 0`: the peers' 30 ms request, deca_p2p/timeslice.py, side by side with none), and
the same run in one process
(`deca-peer simulate`, 1 thread) twice: as `make simulate` runs it (no metrics: no evaluation until the end), and
with `--run-dir` (metrics, and so the same periodic evaluations every peer of the cluster makes). Efficiency =
(simulate wall / cores) / cluster wall: 1.0 would mean the 8 processes use every core all the time with no overhead
over the one-process reference. Also per peer, from the metrics (`cpu_s`: the process's CPU seconds at each record;
`compute_cpu_s`: the step's own thread CPU): compute wall and CPU, waiting, the other CPU of the training span
(exchange, mix, evaluations, checkpoints, logging), and the wall before the first and after the last step. And where
the CPU goes: every process's CPU (getrusage of the children), and per peer by part of the loop (`cpu_parts` in the
final records, deca_p2p/cpu_parts.py), the cluster's peers against simulate's. And the machine's ceiling: a shorter
simulate alone against one copy per core side by side (`both_cores_ceiling`): what a run that keeps every core busy
can reach here at best.

    .venv/bin/python benchmarks/cluster_efficiency.py [--rounds N]

Writes benchmarks/results/cluster_efficiency.md, and appends the run to cluster_efficiency_runs.jsonl (the md lists
every run there: this machine's run-to-run spread is several per cent).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine_facts

from deca_p2p.bootstrap import free_base_port
from deca_p2p.cpu_parts import PARTS
from deca_p2p.metrics import read_metrics

TOPO = ROOT / "topologies" / "ring8.json"
UNTIMED = "main thread, untimed (start-up, bye, bookkeeping)"
THREADS = "other threads (transport: ZeroMQ I/O, link senders, handshake monitor)"
RUNS = RESULTS / "cluster_efficiency_runs.jsonl"
SLICE0 = "cluster --time-slice-ms 0"  # the kernel's default slice (before timeslice.py)
CEILING_ROUNDS, CEILING_REPS = 6, 2    # the ceiling's simulate: long enough that start-up is not most of it


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the command and every process under it: the peers are reaped by the fork server, it by
    the command, the command by us, so RUSAGE_CHILDREN holds them all)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def both_cores_ceiling(cmd: list[str], cores: int, reps: int = CEILING_REPS) -> dict:
    """How fast one process runs when every core is busy: CMD (a short simulate) alone, then CORES copies side by
    side, REPS times (medians). The ratio is the best efficiency any CORES-process run can reach on this machine:
    below 1 where the cores share a cache, memory bandwidth or a VM host's time."""
    alone, together = [], []
    for _ in range(reps):
        alone.append(timed(cmd)[0])
        with tempfile.TemporaryFile() as err:  # (a pipe could fill and stall a copy while we wait on another)
            t0 = time.perf_counter()
            procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err) for _ in range(cores)]
            codes = [p.wait() for p in procs]
            together.append(time.perf_counter() - t0)
            if any(codes):
                err.seek(0)
                raise SystemExit(f"{' '.join(cmd)} failed: {err.read().decode(errors='replace')[-2000:]}")
    a, t = statistics.median(alone), statistics.median(together)
    return {"alone": a, "together": t, "ceiling": a / t}


def cpu_parts(data: dict[int, list[dict]]) -> dict[str, float]:
    """Mean per peer of the final record's CPU by part (cpu_parts.py), and for a peer process its main thread's
    CPU outside those parts and its other threads' (ZeroMQ's I/O thread, the link senders)."""
    finals = [next(r for r in reversed(recs) if r.get("event") == "final") for recs in data.values()]
    names = list(dict.fromkeys(k for f in finals for k in f.get("cpu_parts", {})))
    out = {k: statistics.mean(f.get("cpu_parts", {}).get(k, 0.0) for f in finals) for k in names}
    if all("cpu_main_s" in f for f in finals):
        out[UNTIMED] = statistics.mean(f["cpu_main_s"] - sum(f["cpu_parts"].values()) for f in finals)
        out[THREADS] = statistics.mean(f["cpu_process_s"] - f["cpu_main_s"] for f in finals)
    return out


def per_peer(data: dict[int, list[dict]], t_launch: float, t_end: float) -> dict:
    rows = []
    for recs in data.values():
        steps = [r for r in recs if r.get("event") == "step"]
        comp_cpu = sum(r.get("compute_cpu_s") or 0.0 for r in steps)
        rows.append({"compute": sum(r["compute_s"] for r in steps), "compute_cpu": comp_cpu,
                     "wait": sum(r.get("wait_s") or 0.0 for r in steps),
                     "train_span": steps[-1]["time"] - steps[0]["time"],
                     "other_cpu": steps[-1]["cpu_s"] - steps[0]["cpu_s"] - comp_cpu,
                     "before": steps[0]["time"] - t_launch, "after": t_end - steps[-1]["time"]})
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]}


def parts_table(rows: dict, sim_cpu: float, sim_parts: dict[str, float], n: int, cores: int) -> list[str]:
    """Where the CPU goes, per peer: simulate --run-dir against each cluster run, by part (cpu_parts.py)."""
    names = sorted({*sim_parts, *(k for r in rows.values() for k in r["parts"])},
                   key=lambda k: (PARTS.index(k) if k in PARTS else len(PARTS), k))
    L = ["## Where the CPU goes", "",
         f"CPU seconds of every process of the command (`getrusage`, children): simulate --run-dir {sim_cpu:.1f} s; "
         + "; ".join(f"{name} {r['cpu']:.1f} s (x{r['cpu'] / sim_cpu:.2f}; the cores were idle "
                     f"{100 * max(0.0, 1 - r['cpu'] / (r['wall'] * cores)):.0f}% of its wall)" for name, r in rows.items())
         + ". Per peer, by part: each peer's own thread CPU in each part of its loop (`cpu_parts` in its final "
         "metrics record; simulate times its peers' parts the same way), means over the peers:", "",
         "| part | simulate --run-dir | " + " | ".join(f"`{k}`" for k in rows) + " | " +
         " | ".join(f"`{k}` - simulate" for k in rows) + " |",
         "|---|---:|" + "---:|" * (2 * len(rows))]

    def line(label: str, sim: float | None, vals: list[float]) -> str:
        cell = "" if sim is None else f"{sim:.2f}"
        return (f"| {label} | {cell} | " + " | ".join(f"{v:.2f}" for v in vals) + " | "
                + " | ".join(f"{v - (sim or 0.0):+.2f}" for v in vals) + " |")

    for k in names:  # (simulate's own start-up and threads are in its shared row: no cell of its own here)
        L.append(line(k, None if k in (UNTIMED, THREADS) else sim_parts.get(k, 0.0),
                      [r["parts"].get(k, 0.0) for r in rows.values()]))
    shared = [r["cpu"] / n - sum(r["parts"].values()) for r in rows.values()]
    L.append(line("the command, the fork server, the averaging (a peer's share)", sim_cpu / n - sum(sim_parts.values()),
                  shared))
    L.append(line("**all**", sim_cpu / n, [r["cpu"] / n for r in rows.values()]))
    L += ["", "simulate's last-but-one row is its start-up, the averaging and its report, shared by the "
          f"{n} peers it runs.", ""]
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="fewer rounds than the default (a quicker, rougher measurement)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    n_peers = len(json.loads(TOPO.read_text())["nodes"])
    extra = ["--rounds", str(a.rounds)] if a.rounds else []
    deca = [sys.executable, "-m", "deca_p2p.cli"]
    tmp = Path(tempfile.mkdtemp(prefix="cluster-eff-"))
    load0 = os.getloadavg()[0]
    rows = {}
    for name, flags in (("cluster", []), ("cluster --overlap", ["--overlap"]),
                        (SLICE0, ["--time-slice-ms", "0"])):
        run_dir = tmp / name.replace(" ", "_")
        t_launch = time.time()
        wall, cpu = timed(deca + ["cluster", "--topology", str(TOPO), "--no-live", "--run-dir", str(run_dir),
                                  "--base-port", str(free_base_port(8)), *extra, *flags])
        t_end = time.time()
        data = read_metrics(run_dir)  # each peer's metrics, read once
        rows[name] = {"wall": wall, "cpu": cpu, "parts": cpu_parts(data), **per_peer(data, t_launch, t_end)}
        print(f"{name}: {wall:.1f} s", flush=True)
    sims, sim_cpu = {}, {}
    simulate = deca + ["simulate", "--topology", str(TOPO), "--threads", "1"]
    for name, flags in (("simulate", []), ("simulate --run-dir", ["--run-dir", str(tmp / "sim")])):
        sims[name], sim_cpu[name] = timed(simulate + [*extra, *flags])
        print(f"{name}: {sims[name]:.1f} s", flush=True)
    sim_parts = cpu_parts(read_metrics(tmp / "sim"))
    ceiling = both_cores_ceiling(simulate + ["--rounds", str(CEILING_ROUNDS)], cores)
    print(f"both cores busy: {ceiling}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RUNS, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "rounds": a.rounds,
                            "sims": sims, "sim_cpu": sim_cpu, "sim_parts": sim_parts, "rows": rows,
                            "ceiling": ceiling}) + "\n")
    same, bare = sims["simulate --run-dir"], sims["simulate"]
    cmd = ".venv/bin/python benchmarks/cluster_efficiency.py" + (f" --rounds {a.rounds}" if a.rounds else "")
    L = ["# make cluster against the ideal speed-up", "", f"Command: `{cmd}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.",
         "", f"ring8, every `make cluster` default{' but ' + ' '.join(extra) if extra else ''}; the same run in one "
         f"process with 1 thread: `deca-peer simulate --run-dir` (metrics and the periodic evaluations every cluster "
         f"peer makes: the same work) **{same:.1f} s**, `deca-peer simulate` as `make simulate` runs it (no metrics, "
         f"no evaluation before the end) {bare:.1f} s. {cores} cores, so the ideal cluster wall is {same / cores:.1f} s "
         f"for the same work. Target (issue 12): efficiency >= 0.8 (it was 0.59 against plain `simulate`).", "",
         f"**The machine's ceiling: {ceiling['ceiling']:.2f}.** The same one-process simulate "
         f"(`--rounds {CEILING_ROUNDS}`) takes {ceiling['alone']:.1f} s alone and {ceiling['together']:.1f} s when "
         f"{cores} copies run side by side (medians of {CEILING_REPS}): with every core busy, each runs at "
         f"{ceiling['ceiling']:.2f} of its speed alone (below 1 where the cores share a cache, memory bandwidth or a "
         "VM host's time), and no run that keeps every core busy, however little it adds, can pass that efficiency "
         "here. Last column: the efficiency as a share of that ceiling.", "",
         "| run | wall s | efficiency: same work (simulate --run-dir / cores / wall) | against plain simulate | "
         "per peer: compute s | compute CPU s | waiting s | other CPU in training s | before first step s | "
         "after last step s | share of the ceiling |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        L.append(f"| `{name}` | {r['wall']:.1f} | **{same / cores / r['wall']:.2f}** | {bare / cores / r['wall']:.2f} | "
                 f"{r['compute']:.1f} | {r['compute_cpu']:.1f} | {r['wait']:.1f} | {r['other_cpu']:.1f} | "
                 f"{r['before']:.1f} | {r['after']:.1f} | {same / cores / r['wall'] / ceiling['ceiling']:.2f} |")
    L += ["", "Wall times include everything the command does: start-up (imports, model load, the initial evaluation, "
          "hello barrier), training, the evaluations and checkpoints, and (cluster) the network average and its "
          "evaluation. Per peer: *compute* is the local steps' wall time, *compute CPU* the CPU time they got (8 peers "
          "share 2 cores: the rest is waiting for a core); *other CPU in training*: the process's CPU between its first "
          "and last step that was not a local step (exchanges, the mix, periodic evaluations, checkpoints, logging, "
          "transport threads); *before first step*: from the command's start (imports, fork, load, initial "
          "evaluation, barrier); *after last step*: to the command's end (final evaluation, averaging, report). "
          "With `--overlap`, waiting is only what the gradient did not hide.", "",
          *parts_table(rows, sim_cpu["simulate --run-dir"], sim_parts, n_peers, cores),
          f"## Every run in `{RUNS.name}` (efficiency at the same work; against plain simulate in brackets)", "",
          "| run | commit | rounds | simulate --run-dir s | simulate s | cluster s | cluster --overlap s | "
          "efficiency blocking | efficiency --overlap | `--time-slice-ms 0` s (efficiency) | ceiling |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in RUNS.read_text().splitlines():
        r = json.loads(line)
        sm, bs, c, o = (r["sims"]["simulate --run-dir"], r["sims"]["simulate"], r["rows"]["cluster"]["wall"],
                        r["rows"]["cluster --overlap"]["wall"])
        L.append(f"| {r['time']} | {r['commit']}{' (' + r['note'] + ')' if r.get('note') else ''} | "
                 f"{r['rounds'] or 'default'} | {sm:.1f} | {bs:.1f} | {c:.1f} | {o:.1f} | "
                 f"{sm / cores / c:.2f} ({bs / cores / c:.2f}) | {sm / cores / o:.2f} ({bs / cores / o:.2f}) | "
                 + (f"{r['rows'][SLICE0]['wall']:.1f} ({sm / cores / r['rows'][SLICE0]['wall']:.2f}) |"
                    if SLICE0 in r["rows"] else "– (no such run before the 30 ms slice) |")
                 + (f" {r['ceiling']['ceiling']:.2f} |" if "ceiling" in r else " – (not measured before) |"))
    L += [""]
    (RESULTS / "cluster_efficiency.md").write_text("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
