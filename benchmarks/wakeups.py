"""Who wakes whom in `make cluster`: every peer thread's context switches, this tree against an earlier commit.

    .venv/bin/python benchmarks/wakeups.py [--baseline REV] [--reps N] [--window S]

With 8 peers on 2 cores, every thread that wakes up with the kernel's short time slice gets an early deadline and
preempts whichever peer is computing; the step it cuts then refills its caches (deca_p2p/timeslice.py). This runs
`make cluster`'s job (ring8, embedded model, unlimited links, 6 rounds) with this tree's code and with REV's (a git
worktree, first on PYTHONPATH), the pairs back to back, alternating which goes first, and reads each peer thread's
voluntary and involuntary context switches from /proc over WINDOW seconds of training (from 3 s after the last peer
logged `ready`). Threads by kind: the training thread (the main one), ZeroMQ's I/O threads (`ZMQbg/IO/*`), and the
Python helpers (the link sender threads and pyzmq's garbage-collector thread, which /proc names alike). Also each
run's wall time and CPU, which the machine's spread dominates at this size: the switches are the measurement.

Writes benchmarks/results/wakeups.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_efficiency import TOPO  # noqa: E402
from common import RESULTS, ROOT, machine_facts  # noqa: E402

from deca_p2p.bootstrap import free_base_port  # noqa: E402
from deca_p2p.metrics import read_metrics  # noqa: E402

ROUNDS = 6
BASELINE = "c9cb5e9"  # the last commit before the link threads stopped waking on every send
KINDS = ("training thread", "ZeroMQ I/O", "Python helpers")


def _kind(pid: int, tid: int, comm: str) -> str | None:
    if tid == pid:
        return "training thread"
    if comm.startswith("ZMQbg/IO/"):
        return "ZeroMQ I/O"
    if comm.startswith("ZMQbg/"):  # the reaper: idle but at exit
        return None
    return "Python helpers"


def _switches(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (comm, voluntary, involuntary) for every thread of PID."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        except OSError:  # it ended meanwhile
            continue
        val = {k: int(v) for k, v in (line.split(":") for line in status if line.endswith(tuple("0123456789"))
                                      and "ctxt_switches" in line)}
        out[int(tid)] = (comm, val["voluntary_ctxt_switches"], val["nonvoluntary_ctxt_switches"])
    return out


def _minor_faults(pid: int) -> int:
    """The process's minor page faults so far (/proc/<pid>/stat): memory it touched fresh, e.g. a buffer malloc could
    not reuse because the last one was not let go yet."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _peer_pids(run_dir: Path, n: int, timeout_s: float = 120.0) -> dict[int, int]:
    """Peer id -> pid, once all N peers have logged `ready` (the hello barrier passed: training starts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        recs = read_metrics(run_dir)
        ready = {p: r for p, r in recs.items() if any(x.get("event") == "ready" for x in r)}
        if len(ready) == n:
            return {p: next(x["pid"] for x in r if x.get("event") == "start") for p, r in ready.items()}
        time.sleep(0.2)
    raise SystemExit(f"{run_dir}: the peers were not all ready after {timeout_s:.0f} s")


def run(label: str, tree: Path, run_dir: Path, window_s: float) -> dict:
    """One cluster run: wall, CPU, and per peer and kind of thread, switches per second over the window."""
    cmd = [sys.executable, "-m", "deca_p2p.cli", "cluster", "--topology", str(TOPO), "--no-live",
           "--run-dir", str(run_dir), "--base-port", str(free_base_port(8)), "--rounds", str(ROUNDS)]
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=log, stderr=subprocess.STDOUT)
        pids = _peer_pids(run_dir, 8)
        time.sleep(3.0)
        before = {peer: _switches(pid) for peer, pid in pids.items()}
        faults0 = sum(_minor_faults(pid) for pid in pids.values())
        time.sleep(window_s)
        after = {peer: _switches(pid) for peer, pid in pids.items()}
        faults = (sum(_minor_faults(pid) for pid in pids.values()) - faults0) / window_s / len(pids)
        code = p.wait()
        if code != 0:
            log.seek(0)
            raise SystemExit(f"{label}: {' '.join(cmd)} failed:\n{log.read().decode(errors='replace')[-3000:]}")
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    per_kind = {k: {"voluntary": 0.0, "involuntary": 0.0, "threads": 0} for k in KINDS}
    for peer, pid in pids.items():
        for tid, (comm, vol, inv) in after[peer].items():
            kind = _kind(pid, tid, comm)
            if kind is None:
                continue
            _, vol0, inv0 = before[peer].get(tid, (comm, 0, 0))  # a thread started inside the window: all of it
            per_kind[kind]["voluntary"] += (vol - vol0) / window_s / len(pids)
            per_kind[kind]["involuntary"] += (inv - inv0) / window_s / len(pids)
            per_kind[kind]["threads"] += 1 / len(pids)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} CPU s; per peer and s: " + ", ".join(
        f"{k} {v['voluntary']:.1f} woke / {v['involuntary']:.1f} preempted" for k, v in per_kind.items())
        + f", {faults:.0f} minor page faults", flush=True)
    return {"wall": wall, "cpu": cpu, "kinds": per_kind, "faults": faults}


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree))  # (-m puts the working directory first too; the fork server keeps it)


def _which(tree: Path) -> Path:
    """The deca_p2p package a command run in TREE imports (a worktree's must win over the editable install)."""
    return Path(subprocess.run([sys.executable, "-c", "import deca_p2p; print(deca_p2p.__file__)"], env=_env(tree),
                               cwd=tree, capture_output=True, text=True, check=True).stdout.strip()).resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    ap.add_argument("--reps", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of training sampled per run (default 10)")
    a = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", a.baseline], cwd=ROOT, capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"--baseline {a.baseline}: not a commit of this repository")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "deca_p2p"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="wakeups-"))
    wt = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(wt), rev.stdout.strip()], cwd=ROOT, check=True)
    try:
        trees = {"this tree": ROOT, f"baseline {rev.stdout.strip()}": wt}
        for label, tree in trees.items():
            if tree.resolve() not in _which(tree).parents:
                raise SystemExit(f"{label}: imports deca_p2p from {_which(tree)}, not from {tree}")
        load0 = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for i in range(a.reps):
            for label in (list(trees) if i % 2 == 0 else list(reversed(trees))):
                runs[label].append(run(label, trees[label], tmp / f"r{i}-{label[:4]}", a.window))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    write(a, runs, head + (" with uncommitted changes" if dirty else ""), load0)


def write(a, runs: dict[str, list[dict]], head: str, load0: float) -> None:
    mean = statistics.mean
    labels = list(runs)
    L = ["# Wake-ups and preemptions per peer in `make cluster`: this tree against an earlier commit", "",
         f"Command: `.venv/bin/python benchmarks/wakeups.py --baseline {a.baseline} --reps {a.reps} --window "
         f"{a.window:g}`  ", f"Code: this tree is {head}.  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}; 1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after.",
         "", f"`make cluster`'s job ({ROUNDS} rounds), {a.reps} pairs of runs back to back, alternating which goes "
         f"first. Per peer, context switches per second over {a.window:g} s of training (from /proc; means over the "
         "peers and runs). *Woke*: voluntary switches, each one a sleep and a wake-up; *preempted*: involuntary ones. "
         "The Python helpers are the link sender threads and pyzmq's garbage-collector thread.", "",
         "| kind of thread | " + " | ".join(f"{lb}: woke / s | {lb}: preempted / s" for lb in labels) + " |",
         "|---|" + "---:|" * (2 * len(labels))]
    for k in KINDS:
        cells = []
        for lb in labels:
            cells += [f"{mean(r['kinds'][k]['voluntary'] for r in runs[lb]):.1f}",
                      f"{mean(r['kinds'][k]['involuntary'] for r in runs[lb]):.1f}"]
        L.append(f"| {k} ({mean(r['kinds'][k]['threads'] for r in runs[labels[0]]):.0f} / "
                 f"{mean(r['kinds'][k]['threads'] for r in runs[labels[1]]):.0f} per peer) | " + " | ".join(cells) + " |")
    tot = {lb: [sum(r["kinds"][k]["voluntary"] for k in KINDS) for r in runs[lb]] for lb in labels}
    L.append("| **all** | " + " | ".join(f"**{mean(tot[lb]):.1f}** | **{mean(sum(r['kinds'][k]['involuntary'] for k in KINDS) for r in runs[lb]):.1f}**"
                                       for lb in labels) + " |")
    L += ["", "Minor page faults per peer and second (the process): " + ", ".join(
        f"{lb} {mean(r['faults'] for r in runs[lb]):.0f}" for lb in labels) + ".",
          "", "## The runs", "", "| pair | " + " | ".join(f"{lb}: wall s | {lb}: CPU s" for lb in labels)
          + f" | wall: {labels[0]} / {labels[1]} |", "|---:|" + "---:|" * (2 * len(labels) + 1)]
    for i, pair in enumerate(zip(*(runs[lb] for lb in labels)), 1):
        L.append(f"| {i} | " + " | ".join(f"{r['wall']:.1f} | {r['cpu']:.1f}" for r in pair)
                 + f" | {pair[0]['wall'] / pair[1]['wall']:.3f} |")
    w = {lb: mean(r["wall"] for r in runs[lb]) for lb in labels}
    L.append("| **mean** | " + " | ".join(f"**{w[lb]:.1f}** | {mean(r['cpu'] for r in runs[lb]):.1f}" for lb in labels)
             + f" | **{w[labels[0]] / w[labels[1]]:.3f}** |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wakeups.md").write_text("\n".join(L) + "\n")
    print((RESULTS / "wakeups.md").read_text())


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
