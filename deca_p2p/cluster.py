"""Launch and watch a whole local network: one `deca-peer start` OS process per node (started by launch.py).

The live view reads each peer's JSONL metrics as they are written; Ctrl-C (or SIGTERM) sends SIGTERM to every
peer (each stops at a step boundary with a final checkpoint), then SIGKILL to any still alive after a grace
period, so no process is left behind.
"""
from __future__ import annotations

import json
import multiprocessing.connection
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .launch import Launcher, PeerProcess
from .metrics import METRICS_FILE, peer_dir
from .report import AVERAGE_DIR, AVERAGE_EVAL, fmt, make_plots, write_report
from .topology import Topology


class _Tail:
    """Reads a growing JSONL file incrementally; keeps the latest record of each event kind."""

    def __init__(self, path: Path):
        self.path, self.offset, self.buf = path, 0, ""
        self.latest: dict[str, dict] = {}
        self.compute_s = self.wait_s = 0.0
        self.alone = False  # the last exchange found no live neighbour (a step record's `alone`)
        self.flagged: list | None = None  # robust mixing: the neighbours flagged at the last exchange (None: off)

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.latest[rec.get("event", "?")] = rec
            if rec.get("event") == "step":
                self.compute_s += rec.get("compute_s") or 0.0
                self.wait_s += rec.get("wait_s") or 0.0
                if "alone" in rec:  # exchange steps only
                    self.alone = bool(rec["alone"])
                if "flagged" in rec:  # exchange steps of a robust mix only
                    self.flagged = rec["flagged"] or []


def _live_table(topo: Topology, procs: dict[int, PeerProcess | subprocess.Popen], tails: dict[int, _Tail], t0: float) -> Table:
    t = Table(title=f"{topo.name}: {len(procs)} peers, {time.monotonic() - t0:.0f} s")
    robust = any(tail.flagged is not None for tail in tails.values())  # a robust mix runs (robust.py)
    for col in ("peer", "state", "round", "block", "step", "loss", "MB sent", "computing", "waiting", "eval acc",
                *(["flagged"] if robust else [])):
        t.add_column(col, justify="right")
    for i, p in sorted(procs.items()):
        tail = tails[i]
        s = tail.latest.get("step", {})
        ev = tail.latest.get("eval", {})
        code = p.poll()
        state = "running" if code is None else ("done" if code == 0 else f"exit {code}")
        if code is None and "step" not in tail.latest:
            state = "starting"
        elif code is None and tail.alone:
            state = "alone"  # no live neighbour: every one said bye or stopped answering
        busy = tail.compute_s + tail.wait_s
        t.add_row(str(i), state, str(s.get("round", "")), str(s.get("block", "")), str(s.get("step", "")),
                  fmt(s.get("loss"), 3) if "loss" in s else "", f"{(s.get('bytes_sent') or 0) / 1e6:.1f}",
                  f"{100 * tail.compute_s / busy:.0f}%" if busy else "", f"{100 * tail.wait_s / busy:.0f}%" if busy else "",
                  fmt(ev.get("acc"), 3) if "acc" in ev else "",
                  *([",".join(map(str, tail.flagged or []))] if robust else []))  # neighbours it flags now
    return t


def _wait_for_an_exit(procs: dict[int, PeerProcess | subprocess.Popen], timeout: float) -> None:
    """Sleep `timeout`, or less: until a running peer exits, where each has a sentinel (forked peers). The last
    peer's exit then starts the averaging at once, not at the next half-second tick."""
    running = [p for p in procs.values() if p.poll() is None]
    if running and all(hasattr(p, "sentinel") for p in running):
        multiprocessing.connection.wait([p.sentinel for p in running], timeout)
    else:
        time.sleep(timeout)


def stop_all(procs: dict[int, PeerProcess | subprocess.Popen], grace_s: float = 30.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def score_average(run_dir: Path, eval_files: Sequence[Path]) -> dict:
    """Write the network average of the peers' final checkpoints to RUN/average (an HF model directory) and
    score it on `eval_files` (RUN/average/eval.json): the one model a consortium would deploy."""
    from .average import average_run
    from .config import make_config
    from .data import load_jsonl
    from .runtime import evaluate_run, load

    out = average_run(run_dir, run_dir / AVERAGE_DIR)
    if not eval_files:
        return {}
    cfg = make_config(None, json.loads((run_dir / "config.json").read_text()))
    lm = load(cfg, out)
    evals = [e for f in eval_files for e in load_jsonl(f)]
    metrics = evaluate_run(cfg, lm.model, lm.tokenizer, evals, lm.max_len)
    (out / AVERAGE_EVAL).write_text(json.dumps(metrics))
    return metrics


def run_cluster(topo: Topology, topology_path: str, run_dir: Path, peer_args: Sequence[str], *,
                live: bool = True, console: Console | None = None, per_peer_args: dict[int, list[str]] | None = None,
                average_eval: Sequence[Path] | None = None, launcher: Launcher | None = None) -> int:
    """Start every peer, show them until all exit, print the final table; returns 0 when all peers succeeded.
    `per_peer_args` are each peer's own options (its --data and --eval-data). When every peer finished and
    `average_eval` is not None, the network average is written and scored on those files (its own table row).
    `launcher` starts the peers (launch.py; default: one for the embedded model)."""
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[int, PeerProcess | subprocess.Popen] = {}
    tails = {i: _Tail(peer_dir(run_dir, i) / METRICS_FILE) for i in topo.nodes}
    interrupted = False

    def on_signal(signum, frame):
        nonlocal interrupted
        interrupted = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    t0 = time.monotonic()
    own_launcher = launcher is None
    try:
        launcher = launcher or Launcher()
        for i in topo.nodes:
            peer_dir(run_dir, i).mkdir(parents=True, exist_ok=True)
            argv = ["start", "--id", str(i), "--neighbors", topology_path, "--run-dir", str(run_dir), *peer_args,
                    *(per_peer_args or {}).get(i, [])]
            procs[i] = launcher.start(argv, peer_dir(run_dir, i) / "peer.log")
        with Live(_live_table(topo, procs, tails, t0), console=console, refresh_per_second=2,
                  transient=False) if live else _NoLive() as view:
            while not interrupted and any(p.poll() is None for p in procs.values()):
                if any(p.poll() not in (None, 0) for p in procs.values()):
                    break  # a peer failed: stop the rest rather than let them wait for it
                _wait_for_an_exit(procs, 0.5)
                for tail in tails.values():
                    tail.poll()
                view.update(_live_table(topo, procs, tails, t0))
            if interrupted or any(p.poll() is None for p in procs.values()):
                stop_all(procs)
            for tail in tails.values():
                tail.poll()
            view.update(_live_table(topo, procs, tails, t0))
    finally:
        stop_all(procs, grace_s=5.0)
        for s, h in old.items():
            signal.signal(s, h)
    failed = {i: p.returncode for i, p in procs.items() if p.returncode != 0}
    for i, code in sorted(failed.items()):
        log = (peer_dir(run_dir, i) / "peer.log").read_text().strip().splitlines()
        console.print(f"peer {i} exited with {code}: {log[-1] if log else '(no output)'}")
    average = None
    if not failed and not interrupted and average_eval is not None:  # in a process that has the imports ...
        average = launcher.submit(score_average, run_dir, average_eval)
    if any((peer_dir(run_dir, i) / METRICS_FILE).is_file() for i in topo.nodes):
        make_plots(run_dir)  # ... while the plots are drawn here
    if average is not None:
        try:
            average.get()
        except Exception as e:  # noqa: BLE001 - the peers' own checkpoints are intact; say why and go on
            console.print(f"could not average the peers' checkpoints: {' '.join(str(e).split())[:300]}")
    if own_launcher:
        launcher.close()
    write_report(run_dir, title=f"{topo.name}: {time.monotonic() - t0:.0f} s, run dir {run_dir}", plots=False)
    console.print(f"run directory: {run_dir}")
    return 0 if not failed else 1


class _NoLive:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *_):
        pass
