"""What training costs on slow, distant links: real peers on ring8 with emulated latency and bandwidth.

    .venv/bin/python benchmarks/bandwidth_latency.py [--quick]

For latency {0, 10, 50, 100} ms x bandwidth {100, 1000 Mbit/s, unlimited}, runs `deca-peer cluster` (8 real
peer processes, embedded model, layer blocks only so every message has the same size S) and measures from
the peers' JSONL metrics:
  * achieved goodput per link: S / (one-way delay − L), over block messages sent after their receiver had begun
    its exchange, so that it was waiting for them (a message that arrived while the receiver computed would count
    its compute time). Which messages count is decided by when they were sent, never by when they were read: a
    rule on the read time (read > 5 ms after the receiver began, as before) keeps the messages read late and
    drops those read on time whenever S/R is near that threshold (ring8 at 1 Gbit/s: 6.8 ms);
  * inner-step wall time against compute + L + S/R;
  * the share of time spent waiting on the network.
Then gossip every c = 4 steps instead of every step under 100 ms latency: what it buys in wall time and costs in
eval loss at the same number of inner steps; and, as a control, the same links between 2 peers (one per core).
Writes benchmarks/results/bandwidth_latency.md and .png.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from deca_p2p.bootstrap import free_base_port  # noqa: E402
from deca_p2p.metrics import read_metrics  # noqa: E402
from deca_p2p.topology import generate  # noqa: E402


def run(tmp: Path, name: str, latency: float, bw: float | None, steps: int, extra: list[str], n: int = 8) -> dict:
    topo = generate("ring", n, link={"latency_ms": latency, "bandwidth_mbps": bw})
    tf = tmp / f"{name}.json"
    tf.write_text(topo.to_json())
    run_dir = tmp / name
    t0 = time.time()
    for _ in range(2):  # a port taken between choosing and binding it: once more on fresh ports
        shutil.rmtree(run_dir, ignore_errors=True)
        p = subprocess.run([sys.executable, "-m", "deca_p2p.cli", "cluster", "--topology", str(tf), "--no-live",
                            "--run-dir", str(run_dir), "--base-port", str(free_base_port(n)), "--threads", "1",
                            "--rounds", "1", "--inner-steps", str(steps), "--set", "embeddings_block=false",
                            "--set", "head_block=false", "--set", "train_per_task=300", "--set", "eval_per_task=10",
                            *extra], cwd=REPO, capture_output=True, text=True)
        if p.returncode == 0 or "address already in use" not in p.stdout + p.stderr:
            break
    if p.returncode != 0:
        raise SystemExit(f"{name}: cluster failed:\n{p.stdout[-3000:]}")
    return {"name": name, **measure(run_dir, latency, bw), "n": n, "wall": time.time() - t0}


def sent_while_waiting(one_way: float, read_after: float, encode: float) -> bool:
    """Whether a block left its sender (sent_at + encode) no earlier than its receiver began the exchange (t_x):
    read_after - one_way = (t_read - t_x) - (t_read - sent_at) = sent_at - t_x, whatever the read time."""
    return read_after - one_way + encode >= 0.0


def measure(run_dir: Path, latency: float, bw: float | None) -> dict:
    """Goodput, step wall time, compute, waiting share and eval loss of a finished run from its peers' metrics
    (``latency`` in ms and ``bw`` in Mbit/s: the configured link, for the expected step time and the goodput's L)."""
    data = read_metrics(run_dir)
    encode = {(pid, r["seq"]): r.get("encode_s") or 0.0 for pid, recs in data.items() for r in recs
              if r.get("event") == "step" and r.get("seq") is not None}
    goodput, sizes, step_wall, compute, waits, walls = [], [], [], [], 0.0, 0.0
    read_rule: list[float] = []  # the rule before 096866b, for comparison: read > 5 ms after the exchange began
    compute_cpu: list[float] = []  # each local step's own thread CPU (what it costs a core, however shared)
    cpu_step: list[float] = []  # per peer: the CPU its process (every thread) spent per inner step
    act_mean: list[float] = []  # per peer and activation: wall time per step over the steps after its first
    for recs in data.values():
        steps_ = [r for r in recs if r.get("event") == "step"]
        acts: dict[tuple, list[dict]] = {}
        for r in steps_:
            acts.setdefault((r.get("round"), r["block"]), []).append(r)
        cpu = []
        for rs in acts.values():  # within an activation: no eval or block switch in between
            step_wall += [r["time"] - prev["time"] for prev, r in zip(rs, rs[1:])]
            if len(rs) > 2:  # from the first step's record to the last
                act_mean.append((rs[-1]["time"] - rs[0]["time"]) / (len(rs) - 1))
                if "cpu_s" in rs[0] and "cpu_s" in rs[-1]:
                    cpu.append((rs[-1]["cpu_s"] - rs[0]["cpu_s"]) / (len(rs) - 1))
        if cpu:
            cpu_step.append(statistics.median(cpu))
        for r in steps_:
            compute.append(r["compute_s"])
            if r.get("compute_cpu_s") is not None:
                compute_cpu.append(r["compute_cpu_s"])
            waits += r.get("wait_s") or 0.0
            walls += r["compute_s"] + (r.get("wait_s") or 0.0)
            for src, (nbytes, one_way, read_after) in (r.get("links") or {}).items():
                if nbytes is None:
                    continue
                sizes.append(nbytes)
                # the sender stamps its message before encoding it: take its encode time off the delay
                enc = encode.get((int(src), r["seq"]), 0.0)
                transfer = one_way - enc - latency / 1e3
                if read_after is not None and sent_while_waiting(one_way, read_after, enc) and transfer > 0:
                    goodput.append(nbytes * 8 / transfer / 1e6)
                if read_after is not None and read_after > 0.005 and transfer > 0:
                    read_rule.append(nbytes * 8 / transfer / 1e6)
    finals = [r for recs in data.values() for r in recs if r.get("event") == "final"]
    late = [f["handoff_late_ms"] for f in finals if f.get("handoff_late_ms") is not None]
    S = statistics.median(sizes)
    c = statistics.median(compute)
    expected = c + latency / 1e3 + (S * 8 / (bw * 1e6) if bw else 0.0)
    return {"latency": latency, "bw": bw, "S": S, "goodput": statistics.median(goodput) if goodput else None,
            "n_goodput": len(goodput), "goodput_read_rule": statistics.median(read_rule) if read_rule else None,
            "step_wall": statistics.median(step_wall), "compute": c, "expected": expected,
            # what a step costs a run: the mean over an activation (the median of single steps misreads runs whose
            # steps alternate long and short, as ring8's two halves do with --overlap)
            "step_mean": statistics.median(act_mean) if act_mean else statistics.median(step_wall),
            "wait_share": waits / walls, "eval_loss": statistics.mean(f["eval_loss"] for f in finals),
            "late_ms": statistics.mean(late) if late else None,
            # what the peers' processes together ask of the CPU per inner step: with more peers than cores, no step
            # can be shorter than this ÷ cores, whatever the overlap hides
            "cpu_step_total": sum(cpu_step) if cpu_step else None,
            "compute_cpu": statistics.mean(compute_cpu) if compute_cpu else None}


def _raw_child(role: str, port: int, size: int, gap: float, n: int) -> None:
    """One side of the raw pyzmq floor: PUSH/PULL of SIZE-byte messages every GAP s, zero-copy, no emulation."""
    import json

    import numpy as np
    import zmq

    ctx = zmq.Context()
    if role == "rx":
        s = ctx.socket(zmq.PULL)
        s.bind(f"tcp://127.0.0.1:{port}")
        s.RCVTIMEO = 60_000
        one_way = []
        for _ in range(n):
            parts = s.recv_multipart(copy=False)
            one_way.append(time.monotonic() - json.loads(bytes(parts[0]))["t0"])
        print(json.dumps(one_way[3:]))  # after a short warm-up
        s.close(linger=0)
    else:
        s = ctx.socket(zmq.PUSH)
        s.connect(f"tcp://127.0.0.1:{port}")
        buf = memoryview(np.random.rand(size // 8)).cast("B")
        time.sleep(0.3)  # connected before the first message
        for _ in range(n):
            s.send_multipart([json.dumps({"t0": time.monotonic()}).encode(), buf], copy=False)
            time.sleep(gap)
        s.close(linger=10_000)
    ctx.term()


def raw_floor(size: float, gap: float, n: int = 80) -> float:
    """Median one-way time (s) of raw pyzmq for a SIZE-byte message between two idle processes on this machine,
    one message every GAP s (the peers' cadence): what any ZeroMQ stack pays on top of an emulated link's S/R."""
    import json

    from common import reap, spawn

    port = free_base_port(1)
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # the peers' environment (deca_p2p/peer_env.py)
    args = ["--port", str(port), "--size", str(int(size)), "--gap", str(gap), "--n", str(n)]
    rx = spawn(__file__, ["--child", "rx", *args], env)
    time.sleep(0.5)
    tx = spawn(__file__, ["--child", "tx", *args], env)
    try:
        out, _ = rx.communicate(timeout=120)
        tx.wait(timeout=60)
    finally:
        reap((rx, tx))
    lines = out.strip().splitlines() if rx.returncode == 0 else []
    if not lines:
        raise SystemExit(f"raw pyzmq floor: the receiver failed (exit code {rx.returncode})")
    return statistics.median(json.loads(lines[-1]))


TABLE_HEAD = ["| latency ms | bandwidth Mbit/s | S (MB) | goodput Mbit/s (median) | goodput / configured | messages | "
              "hand-off late ms (mean) | step wall s | compute + L + S/R s | step / expected | waiting share | "
              "compute CPU ms (mean) | the rule before: goodput / configured over reads > 5 ms after the exchange began |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def worst_ratio(runs: list[dict]) -> float:
    """The lowest achieved / configured goodput over the runs with a configured bandwidth."""
    return min((r["goodput"] / r["bw"] for r in runs if r["bw"] and r["goodput"]), default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    for k in ("--child", "--port", "--size", "--gap", "--n"):
        ap.add_argument(k, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _raw_child(args.child, int(args.port), int(args.size), float(args.gap), int(args.n))
        return
    latencies = [0, 100] if args.quick else [0, 10, 50, 100]
    bws = [100, None] if args.quick else [100, 1000, None]
    steps = 4 if args.quick else 8
    tmp = Path(tempfile.mkdtemp(prefix="bwlat-"))
    load_before = os.getloadavg()[0]
    rows = []
    for lat in latencies:
        for bw in bws:
            r = run(tmp, f"L{lat}-B{bw}", lat, bw, steps, [])
            rows.append(r)
            print(f"L={lat} ms B={bw} Mbit/s: goodput {r['goodput']}, step {r['step_wall']:.3f} s "
                  f"(expected {r['expected']:.3f}), waiting {100 * r['wait_share']:.0f}%", flush=True)
    # c = 1 is the grid's 100 ms / 100 Mbit/s run (the same settings); c = 4 runs here
    every = [next(r for r in rows if r["latency"] == 100 and r["bw"] == 100),
             run(tmp, "every4", 100, 100, steps, ["--gossip-every", "4"])]
    # control: the same links with 2 peers, one per core, so no peer waits for a CPU
    control = [run(tmp, f"pair-L0-B{bw}", 0, bw, 2 * steps, [], n=2) for bw in bws if bw]
    # the hosts' own delivery: raw pyzmq's one-way time for S bytes at the control's cadence
    for r in control:
        r["floor"] = raw_floor(r["S"], r["step_wall"])

    lines = ["# Bandwidth under link latency: ring8, 8 real peer processes, emulated links", "",
             f"Command: `.venv/bin/python benchmarks/bandwidth_latency.py{' --quick' if args.quick else ''}` "
             f"({os.cpu_count()} cores; embedded model, layer blocks only: one message = S bytes = one decoder layer in float32; "
             f"1 round x 4 blocks x {steps} inner steps per configuration; 8 peers share the {os.cpu_count()} cores: a "
             "step's compute wall includes waiting for a core, its CPU time (compute CPU column) does not).", "", *TABLE_HEAD]

    def row(r) -> str:
        ratio = r["goodput"] / r["bw"] if (r["bw"] and r["goodput"]) else None
        late = "–" if r["late_ms"] is None else f"{r['late_ms']:.2f}"
        cpu = "–" if r.get("compute_cpu") is None else f"{1e3 * r['compute_cpu']:.1f}"
        before = f"{r['goodput_read_rule'] / r['bw']:.3f}" if (r["bw"] and r.get("goodput_read_rule")) else "–"
        return (f"| {r['latency']} | {r['bw'] or 'unlimited'} | {r['S'] / 1e6:.3f} | "
                f"{r['goodput']:.0f} | {f'{ratio:.3f}' if ratio else '–'} | {r['n_goodput']} | {late} | "
                f"{r['step_wall']:.3f} | {r['expected']:.3f} | {r['step_wall'] / r['expected']:.2f} | "
                f"{100 * r['wait_share']:.0f}% | {cpu} | {before} |")

    lines += [row(r) for r in rows]
    lines += ["", "Control: the same links between 2 peers (ring of 2, one peer per core, "
              f"{2 * steps} inner steps per block), so that no peer waits for a CPU:", "", *TABLE_HEAD]
    lines += [row(r) for r in control]
    lines += ["", "The hosts' own delivery: raw pyzmq (PUSH/PULL, zero-copy, no emulation, 2 idle processes, one "
              "S-byte message per control step) takes this long one way. An emulator that held each message at the "
              "sender until its due time and then handed it to ZeroMQ whole (this project's before 46af6d4) could "
              "show at best S/R / (S/R + that); this one hands it over when its transmission starts and the "
              "receiver holds it until due (PROTOCOL.md §4.5), so that copying overlaps S/R, as on a wire:", "",
              "| bandwidth Mbit/s | S/R ms | raw pyzmq one-way ms (median) | best possible, store-and-forward | "
              "measured (control) |", "|---|---|---|---|---|"]
    for r in control:
        sr = r["S"] * 8 / (r["bw"] * 1e6)
        lines.append(f"| {r['bw']} | {sr * 1e3:.2f} | {r['floor'] * 1e3:.3f} | {sr / (sr + r['floor']):.3f} | "
                     f"{r['goodput'] / r['bw']:.3f} |")
    worst, pair_worst = worst_ratio(rows), worst_ratio(control)
    lines += ["", "Gossip every c inner steps under 100 ms latency, 100 Mbit/s (same inner steps):", "",
              "| c | step wall s (median) | waiting share | final mean eval loss | run wall s |", "|---|---|---|---|---|"]
    for c, r in zip((1, 4), every):
        lines.append(f"| {c} | {r['step_wall']:.3f} | {100 * r['wait_share']:.0f}% | {r['eval_loss']:.4f} | {r['wall']:.0f} |")
    lines += ["", f"Target: goodput >= 90% of configured wherever configured <= 1 Gbit/s. Worst ratio on ring8: "
              f"{worst:.3f}; with one peer per core (control): {pair_worst:.3f}.", "",
              "How to read it. Goodput = S / (one-way delay − encode time − L), over the block messages sent "
              "after their receiver had begun its exchange, so that it was waiting for them (chosen by when they were sent, not by when they were read). *Hand-off late* is how long after the emulated start of "
              "its transmission a message was handed to ZeroMQ, averaged over all messages (mostly a thread waiting "
              "for a CPU); the receiver holds the message until t_start + S/R + L, so a hand-off late by less than "
              "S/R + L minus the delivery below costs nothing. The delivery: the sender's and the receiver's "
              "ZeroMQ I/O threads copying S bytes through loopback TCP, then the receiving peer's main thread "
              "waking up at the due time. Each of those wake-ups needs a CPU; with 8 peers on 2 cores, 4 "
              "compute-bound peers share each core, and those waits add a few ms to a message when they end after "
              "its due time. At 100 Mbit/s (S/R = 68 ms) that is noise; at 1 Gbit/s (S/R = 6.8 ms) it is as long as "
              "the transmission itself. The control rows show the same stack with a core per peer. On an unlimited "
              "link with latency, the delivery runs inside L, so the goodput column there is no rate: it shows how "
              "little of the one-way delay is left after L.", "",
              f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the 8 peers themselves "
              "load the 2 cores)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bandwidth_latency.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for bw in bws:
        sel = [r for r in rows if r["bw"] == bw]
        axes[0].plot([r["latency"] for r in sel], [r["step_wall"] for r in sel], marker="o",
                     label=f"{bw or 'unlimited'} Mbit/s measured")
        axes[0].plot([r["latency"] for r in sel], [r["expected"] for r in sel], ls="--", lw=1,
                     label=f"{bw or 'unlimited'}: compute + L + S/R")
        if bw:
            axes[1].plot([r["latency"] for r in sel], [r["goodput"] / bw for r in sel], marker="o", label=f"{bw} Mbit/s")
    axes[0].set_xlabel("link latency (ms)")
    axes[0].set_ylabel("inner-step wall time (s)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.9, color="red", ls="--", lw=1, label="target 0.9")
    axes[1].set_xlabel("link latency (ms)")
    axes[1].set_ylabel("achieved / configured goodput")
    axes[1].set_ylim(0, 1.1)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "bandwidth_latency.png", dpi=110)
    print("\n".join(lines))
    print(f"worst achieved/configured goodput (<= 1 Gbit/s links): ring8 {worst:.3f}, one peer per core "
          f"{pair_worst:.3f}; "
          f"gossip every 4 vs 1 at 100 ms: {every[1]['step_wall'] / every[0]['step_wall']:.2f}x step time")


if __name__ == "__main__":
    main()
