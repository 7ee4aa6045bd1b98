"""--overlap: does hiding the exchange behind the gradient pay, and what does the one-step delay cost?

1. Step time, real peers (`deca-peer cluster`, emulated links, layer blocks only so every message is S bytes), with
   and without `--overlap`, side by side in one run: a ring of 2 (one peer per core, so no peer waits for a CPU) at
   100 Mbit/s with 10, 50 and 100 ms one-way latency, batch 32 so that compute and L + S/R are of one order; and
   ring8 (8 peers on the 2 cores) at 100 ms, 100 Mbit/s. Each row: the median inner-step wall time against
   max(compute, L + S/R) (what overlap can reach) and compute + L + S/R (what a blocking exchange costs).
   Compute is the median `compute_s` of the *blocking* run of the same setting (the overlapped gradient shares
   the CPU with the ZeroMQ threads, which is part of what is measured).
2. Convergence at equal steps, in-process (`simulate`, bit-identical to the real peers): the fine-tuning benchmark's
   setting (benchmarks/finetune.py: embedded base, frozen embeddings and head, R = 16, deca with discrepancy none,
   its best lr 3e-3, raw codec) on ring8 and exp16 at α = 0.1, seeds 0-2, blocking vs overlap, paired by seed.

    .venv/bin/python benchmarks/overlap.py [--quick]

Writes benchmarks/results/overlap.md.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bandwidth_latency import run as run_cluster
from common import RESULTS, machine_facts
from finetune import FULL, QUICK, run_one

PAIR_LATENCIES = (10, 50, 100)


def step_time(quick: bool) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="overlap-"))
    steps = 8 if quick else 16
    settings = [(2, lat, 100, ["--batch-size", "32"]) for lat in (PAIR_LATENCIES[:1] if quick else PAIR_LATENCIES)]
    if not quick:
        settings.append((8, 100, 100, []))
    rows = []
    for n, lat, bw, extra in settings:
        pair = {}
        for mode in ("blocking", "overlap"):  # side by side, same setting
            flags = extra + (["--overlap"] if mode == "overlap" else [])
            pair[mode] = run_cluster(tmp, f"n{n}-L{lat}-{mode}", lat, bw, steps, flags, n=n)
            r = pair[mode]
            print(f"n={n} L={lat} B={bw} {mode}: step {r['step_mean']:.3f} s (median of single steps "
                  f"{r['step_wall']:.3f} s), compute {r['compute']:.3f} s", flush=True)
        c = pair["blocking"]["compute"]
        comm = lat / 1e3 + pair["blocking"]["S"] * 8 / (bw * 1e6)
        rows.append({"n": n, "latency": lat, "bw": bw, "S": pair["blocking"]["S"], "compute": c, "comm": comm,
                     "blocking": pair["blocking"]["step_mean"], "overlap": pair["overlap"]["step_mean"],
                     "blocking_median": pair["blocking"]["step_wall"], "overlap_median": pair["overlap"]["step_wall"],
                     "cpu_share": max(pair[m]["cpu_step_total"] or 0.0 for m in pair) / min(n, os.cpu_count() or 1),
                     "loss_blocking": pair["blocking"]["eval_loss"], "loss_overlap": pair["overlap"]["eval_loss"],
                     "wait_blocking": pair["blocking"]["wait_share"], "wait_overlap": pair["overlap"]["wait_share"]})
    return rows


def rows_from_log(path: str) -> list[dict]:
    """Rows from lines "ring8 seed 0 blocking: eval loss 2.5801 (156 s)" (exact match is not in them)."""
    rows: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"(\S+) seed (\d+) (blocking|overlap): eval loss ([\d.]+)", line)
        if m:
            rows.setdefault((m[1], int(m[2])), {"topo": m[1], "seed": int(m[2])})[m[3]] = float(m[4])
    return [r for r in rows.values() if "blocking" in r and "overlap" in r]


def convergence(quick: bool, topologies=("ring8", "exp16")) -> list[dict]:
    p = QUICK if quick else FULL
    out = []
    for topo in ("ring8",) if quick else topologies:
        for seed in range(p["seeds"]):
            row = {"topo": topo, "seed": seed}
            for mode in ("blocking", "overlap"):
                t0 = time.perf_counter()
                r = run_one("deca-none", topo, 0.1, seed, 3e-3, p, {"overlap": mode == "overlap"})
                row[mode] = r["eval_loss"]
                row[mode + "_acc"] = r["acc"]
                print(f"{topo} seed {seed} {mode}: eval loss {r['eval_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            out.append(row)
    return out


def convergence_lines(conv: list[dict], quick: bool, from_log: str | None = None) -> list[str]:
    cmd = ".venv/bin/python benchmarks/overlap.py --convergence-only" + (" --quick" if quick else "")
    if from_log:
        cmd += (f"`, rows taken from its progress lines in `{from_log}` (that run was stopped before exp16 to free the "
                "machine; `--topologies` picks part 2's topologies); report: `.venv/bin/python benchmarks/overlap.py "
                f"--convergence-only --from-log {from_log}")
    L = ["## Convergence at equal steps (in-process, deca / none, lr 3e-3, α = 0.1, R = 16, raw codec)", "",
         f"Command: `{cmd}` ({'rows from the committed log' if from_log else 'run ' + time.strftime('%Y-%m-%d %H:%M')}; "
         "losses, not times: it may share the machine).", "",
         "| topology | seed | eval loss blocking | eval loss overlap | Δ | exact match blocking → overlap |",
         "|---|---:|---:|---:|---:|---|"]
    for r in conv:
        acc = f"{r['blocking_acc']:.3f} → {r['overlap_acc']:.3f}" if "blocking_acc" in r else "–"
        L.append(f"| {r['topo']} | {r['seed']} | {r['blocking']:.4f} | {r['overlap']:.4f} | "
                 f"{r['overlap'] - r['blocking']:+.4f} | {acc} |")
    for topo in sorted({r["topo"] for r in conv}):
        d = [r["overlap"] - r["blocking"] for r in conv if r["topo"] == topo]
        rel = [r["overlap"] / r["blocking"] - 1 for r in conv if r["topo"] == topo]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        L.append(f"\n{topo}: mean Δ eval loss {statistics.mean(d):+.4f} ± {sd:.4f} "
                 f"({100 * statistics.mean(rel):+.1f}%), paired over {len(d)} seeds.")
    L.append("")
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-convergence", action="store_true")
    ap.add_argument("--convergence-only", action="store_true",
                    help="only part 2 (no timing: it may share the machine), merged into an existing overlap.md")
    ap.add_argument("--topologies", default="ring8,exp16", help="part 2's topologies")
    ap.add_argument("--from-log", help="part 2's rows from the progress lines of an earlier run (its output)")
    a = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()[0]
    if a.convergence_only:
        conv = rows_from_log(a.from_log) if a.from_log else convergence(a.quick, a.topologies.split(","))
        text = (RESULTS / "overlap.md").read_text()
        head = text.split("## Convergence")[0].rstrip("\n")
        (RESULTS / "overlap.md").write_text(head + "\n\n" + "\n".join(convergence_lines(conv, a.quick, a.from_log))
                                            + "\n")
        print((RESULTS / "overlap.md").read_text())
        return
    rows = step_time(a.quick)
    conv = [] if a.skip_convergence else convergence(a.quick)
    cmd = ".venv/bin/python benchmarks/overlap.py" + (" --quick" if a.quick else "") + \
        (" --skip-convergence" if a.skip_convergence else "")
    L = ["# --overlap: the exchange hidden behind the gradient", "", f"Command: `{cmd}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t0:.0f} s wall; 1-min load average {load0:.1f} before, "
         f"{os.getloadavg()[0]:.1f} after.", "",
         "## Step time (real peers, emulated links, one round, layer blocks only)", "",
         "Target (issue 12): with overlap, within 15% of max(compute, L + S/R).", "",
         "| peers | L ms | Mbit/s | S MB | compute s | L + S/R s | max s | sum s | blocking step s | overlap step s | "
         "overlap / max | blocking / sum | overlap speed-up | median single step, blocking / overlap s | "
         "peers' CPU per step ÷ cores s | waiting share blocking → overlap |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mx, sm = max(r["compute"], r["comm"]), r["compute"] + r["comm"]
        L.append(f"| {r['n']} | {r['latency']} | {r['bw']} | {r['S'] / 1e6:.3f} | {r['compute']:.3f} | {r['comm']:.3f} | "
                 f"{mx:.3f} | {sm:.3f} | {r['blocking']:.3f} | {r['overlap']:.3f} | **{r['overlap'] / mx:.3f}** | "
                 f"{r['blocking'] / sm:.2f} | {r['blocking'] / r['overlap']:.2f}x | "
                 f"{r['blocking_median']:.3f} / {r['overlap_median']:.3f} | {r['cpu_share']:.3f} | "
                 f"{100 * r['wait_blocking']:.0f}% → {100 * r['wait_overlap']:.0f}% |")
    L += ["", "Ring of 2: one peer per core, batch 32. Ring8: 8 peers on 2 cores, batch as the cluster default; there "
          "a message also waits for a CPU on both ends, which no overlap hides. The waiting share counts the time a "
          "peer's exchange waits (with overlap, only what the gradient did not hide).", "",
          "A step time is what a step costs the run: an activation's wall time from its first step's end to its "
          "last's ÷ the steps in between, the median over peers and activations. The median of single steps (its "
          "own column) misreads ring8 with overlap: ring8 is bipartite, its two halves settle half a step apart, "
          "and every peer's steps alternate long and short (e.g. 0.258 s, 0.108 s, 0.282 s, 0.102 s in one run), "
          "so the median of single steps is the long ones. The CPU column is what all the peers' processes (every "
          "thread) used per step, the same way, ÷ the cores they share (the larger of the blocking and the overlap "
          "run's): no step can be shorter.", ""]
    if conv:
        L += convergence_lines(conv, a.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overlap.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
