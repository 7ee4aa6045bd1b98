"""ZeroMQ's I/O thread with the training thread's 30 ms slice, or the kernel's: side by side, alternating.

    .venv/bin/python benchmarks/io_slice.py [--reps N]

Each peer asks Linux for a 30 ms slice for its training thread (deca_p2p/timeslice.py) and, by default, the same for
its ZeroMQ I/O thread where no link is emulated (`io_time_slice`: auto). With the kernel's short slice the I/O
thread, woken by every neighbour's bytes, preempts whichever peer is computing. This measures what the I/O slice buys
and costs, each pair of runs back to back with it on and off (`--set io_time_slice=always` / `never`), so that the
machine's drift hits both alike:

* `make cluster`'s job (ring8, embedded model, unlimited links), 6 rounds: wall time and CPU of every process;
* emulated links, as benchmarks/bandwidth_latency.py runs them (one round of 24 inner steps, layer blocks): step time
  and goodput / configured on ring8 at 1 Gbit/s and 100 Mbit/s (8 peers on this machine's cores), and between 2
  peers at 1 Gbit/s. The I/O thread reads a neighbour's bytes later where the cores are busy: the goodput, which
  counts a message's time till it is read, can only fall; the question is whether the step time does too. (This is
  why `auto` keeps the kernel's slice on emulated links.)

Writes benchmarks/results/io_slice.md and .png.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth_latency import run as run_links  # noqa: E402
from cluster_efficiency import TOPO, timed  # noqa: E402
from common import RESULTS, ROOT, machine_facts  # noqa: E402

from deca_p2p.bootstrap import free_base_port  # noqa: E402
from deca_p2p.metrics import read_metrics  # noqa: E402
from deca_p2p.timeslice import current_slice_ms  # noqa: E402

ROUNDS = 6
SETTINGS = {"on": ["--set", "io_time_slice=always"], "off": ["--set", "io_time_slice=never"]}
LINK_CASES = [("ring8, 1 Gbit/s", 8, 1000), ("ring8, 100 Mbit/s", 8, 100), ("2 peers, 1 Gbit/s", 2, 1000)]


def check_setting(run_dir: Path, name: str) -> None:
    """Stop unless every peer of the run logged the I/O slice the setting asked for (its `ready` record): 30 ms with
    it on, none with it off."""
    want = [30.0] if name == "on" else []
    got = {pid: next((r.get("io_time_slice_ms") for r in recs if r.get("event") == "ready"), None)
           for pid, recs in read_metrics(run_dir).items()}
    if any(v != want for v in got.values()):
        raise SystemExit(f"{run_dir.name}: the I/O slice is not what '{name}' asks for: {got}")


def cluster_pairs(tmp: Path, reps: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, CPU s) of `deca-peer cluster --rounds 6` per setting, REPS times each, alternating."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in SETTINGS}
    for i in range(reps):
        for name, flags in (SETTINGS.items() if i % 2 == 0 else reversed(SETTINGS.items())):
            wall, cpu = timed([sys.executable, "-m", "deca_p2p.cli", "cluster", "--topology", str(TOPO), "--no-live",
                               "--run-dir", str(tmp / f"c{i}{name}"), "--base-port", str(free_base_port(8)),
                               "--rounds", str(ROUNDS), *flags])
            check_setting(tmp / f"c{i}{name}", name)
            out[name].append((wall, cpu))
            print(f"cluster, I/O slice {name}: {wall:.1f} s wall, {cpu:.1f} CPU s", flush=True)
    return out


def link_pairs(tmp: Path, reps: int) -> dict[str, dict[str, list[dict]]]:
    """bandwidth_latency's measurements per case and setting, REPS times each, alternating."""
    out: dict[str, dict[str, list[dict]]] = {case: {k: [] for k in SETTINGS} for case, _, _ in LINK_CASES}
    for i in range(reps):
        for case, n, bw in LINK_CASES:
            for name, flags in (SETTINGS.items() if i % 2 == 0 else reversed(SETTINGS.items())):
                r = run_links(tmp, f"l{i}{name}{n}-{bw}", 0, bw, 24, flags, n=n)
                check_setting(tmp / f"l{i}{name}{n}-{bw}", name)
                out[case][name].append(r)
                print(f"{case}, I/O slice {name}: step {r['step_mean'] * 1e3:.1f} ms, "
                      f"goodput {r['goodput'] / bw:.3f} of configured", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4, help="pairs of runs per measurement (default 4)")
    a = ap.parse_args()
    if current_slice_ms() is None:
        raise SystemExit("this kernel has no per-task time slices (Linux >= 6.12): nothing to compare")
    tmp = Path(tempfile.mkdtemp(prefix="io-slice-"))
    load0 = os.getloadavg()[0]
    clusters = cluster_pairs(tmp, a.reps)
    links = link_pairs(tmp, a.reps)
    mean = statistics.mean
    on_w, off_w = [w for w, _ in clusters["on"]], [w for w, _ in clusters["off"]]
    wins = sum(x < y for x, y in zip(on_w, off_w))
    L = ["# ZeroMQ's I/O thread: the training thread's 30 ms slice against the kernel's", "",
         f"Command: `.venv/bin/python benchmarks/io_slice.py --reps {a.reps}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.",
         "", "Each pair of runs back to back, on and off alternating which goes first. *on*: `--set "
         "io_time_slice=always`; *off*: `--set io_time_slice=never`, the kernel's slice (as before the setting). The "
         "default, `auto`, is *on* where no link is emulated (the first table) and *off* where one is (the second).",
         "",
         f"## `make cluster`'s job, {ROUNDS} rounds (ring8, unlimited links)", "",
         "| pair | on: wall s | off: wall s | on / off | on: CPU s | off: CPU s |", "|---:|---:|---:|---:|---:|---:|"]
    for i, ((wn, cn), (wf, cf)) in enumerate(zip(clusters["on"], clusters["off"]), 1):
        L.append(f"| {i} | {wn:.1f} | {wf:.1f} | {wn / wf:.3f} | {cn:.1f} | {cf:.1f} |")
    L.append(f"| **mean** | **{mean(on_w):.1f}** | **{mean(off_w):.1f}** | **{mean(on_w) / mean(off_w):.3f}** | "
             f"{mean(c for _, c in clusters['on']):.1f} | {mean(c for _, c in clusters['off']):.1f} |")
    L += ["", f"On was faster in {wins} of {len(on_w)} pairs.", "",
          "## Emulated links (bandwidth_latency.py's runs: 1 round of 24 inner steps, layer blocks, L = 0)", "",
          "| case | pair | on: step ms | off: step ms | on: goodput / configured | off: goodput / configured |",
          "|---|---:|---:|---:|---:|---:|"]
    for case, _, bw in LINK_CASES:
        on, off = links[case]["on"], links[case]["off"]
        for i, (rn, rf) in enumerate(zip(on, off), 1):
            L.append(f"| {case} | {i} | {rn['step_mean'] * 1e3:.1f} | {rf['step_mean'] * 1e3:.1f} | "
                     f"{rn['goodput'] / bw:.3f} | {rf['goodput'] / bw:.3f} |")
        L.append(f"| {case} | **mean** | **{mean(r['step_mean'] for r in on) * 1e3:.1f}** | "
                 f"**{mean(r['step_mean'] for r in off) * 1e3:.1f}** | **{mean(r['goodput'] for r in on) / bw:.3f}** | "
                 f"**{mean(r['goodput'] for r in off) / bw:.3f}** |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "io_slice.md").write_text("\n".join(L) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(1, len(on_w) + 1)
    ax1.plot(x, on_w, "o-", label="I/O thread: 30 ms slice (on)")
    ax1.plot(x, off_w, "s--", label="I/O thread: kernel's slice (off)")
    ax1.set(xlabel="pair of runs", ylabel="wall s", title=f"make cluster's job, {ROUNDS} rounds")
    ax1.legend()
    cases = [c for c, _, _ in LINK_CASES]
    for k, name in enumerate(SETTINGS):
        ys = [mean(r["step_mean"] for r in links[c][name]) * 1e3 for c in cases]
        ax2.bar([i + 0.4 * k for i in range(len(cases))], ys, width=0.4, label=name)
    ax2.set_xticks([i + 0.2 for i in range(len(cases))], cases)
    ax2.set(ylabel="step ms (mean over pairs)", title="emulated links, L = 0")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "io_slice.png", dpi=120)
    print((RESULTS / "io_slice.md").read_text())


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
