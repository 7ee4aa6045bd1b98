"""Would folding the receiver's NaN/Inf scan into the mix make a peer faster? The scan and the mix, side by side.

A peer that receives θ½_j decodes it as a view of the frame that ZeroMQ's I/O thread wrote on the other core, scans
it for NaN/Inf (wire.decode: one sum), and later mixes it (optim.MixAccumulator: acc = w_j θ_j + w_i θ½_i). In
benchmarks/wire_throughput.py that scan is the one thing our receive path does that raw pyzmq does not. The
alternative is to skip the scan at decode and check the mix's result instead (NaN/Inf in any term makes the
weighted sum non-finite; only then look for the culprit). This measures, per block size, on one core while another
process on the other core writes the block before every repetition (as the I/O thread does):

* ``scan``                 the scan alone (what wire_throughput charges the exchange with);
* ``mix``                  the mix alone (two terms: the neighbour's block and our own warm one);
* ``scan, then mix``       what a peer does today;
* ``mix, then check``      the folded alternative: the mix, then the scan of its (warm) result.

Run in the peers' environment (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, one torch thread). The four alternate
within every repetition; medians.

    .venv/bin/python benchmarks/scan_in_mix.py [--reps N]

Writes benchmarks/results/scan_in_mix.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import RESULTS, ROOT, machine_facts

from deca_p2p.peer_env import peer_env

MiB = 1 << 20
SIZES = (1, 4, 16, 64)
KINDS = ("scan", "mix", "scan, then mix", "mix, then check")


def _writer(buf, go, done, n: int) -> None:
    import torch

    os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    for i in range(n):
        go.wait()
        go.clear()
        buf.fill_(0.5 + 1e-3 * (i % 7))  # new bytes from the other core, as ZeroMQ's I/O thread leaves them
        done.set()


def child(reps: int) -> dict:
    import multiprocessing as mp

    import torch

    from deca_p2p.optim import MixAccumulator
    from deca_p2p.codecs import all_finite as _all_finite

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    out = {}
    for mib in SIZES:
        n = mib * MiB // 4
        buf = torch.empty(n).share_memory_()
        own = torch.rand(n)
        go, done = mp.Event(), mp.Event()
        w = mp.Process(target=_writer, args=(buf, go, done, len(KINDS) * (reps + 1)))
        w.start()
        times = {k: [] for k in KINDS}
        for r in range(reps + 1):  # r 0: warm-up
            for kind in KINDS:
                go.set()
                if not done.wait(60):
                    raise SystemExit(f"the writer process stopped (exit {w.exitcode})")
                done.clear()
                t = time.perf_counter()
                if kind.startswith("scan"):
                    assert _all_finite(buf)
                if kind != "scan":
                    acc = MixAccumulator([own])
                    acc.add([buf], 1 / 3)
                    acc.add([own], 2 / 3)
                    mixed = acc.result()
                    if kind == "mix, then check":
                        assert _all_finite(mixed[0])
                dt = time.perf_counter() - t
                mixed = acc = None
                if r:
                    times[kind].append(dt)
        w.join()
        out[str(mib)] = {k: statistics.median(v) for k, v in times.items()}
        print(mib, {k: round(v * 1e3, 3) for k, v in out[str(mib)].items()}, file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100, help="repetitions per size (default 100)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.reps < 1:
        raise SystemExit("--reps must be at least 1")
    if a.child:
        print(json.dumps(child(a.reps)))
        return
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("needs cores 0 and 1: the block is written on one and read on the other")
    env = {**os.environ, **peer_env(os.environ), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__, "--child", "--reps", str(a.reps)], env=env, cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the measuring process failed (exit {p.returncode})")
    res = json.loads(p.stdout)
    lines = ["# The receiver's NaN/Inf scan: before the mix (today) or folded into it", "",
             f"Command: `.venv/bin/python benchmarks/scan_in_mix.py --reps {a.reps}` ({machine_facts()}; the measuring "
             f"process on core 0 in the peers' environment `{env.get('GLIBC_TUNABLES', '')}`, one torch thread; "
             "another process on core 1 writes the block before every repetition; the four alternate within each "
             "repetition; medians).", "",
             "| block MiB | " + " | ".join(f"{k} ms" for k in KINDS) + " | today − mix ms | folded − mix ms |",
             "|---" * (len(KINDS) + 3) + "|"]
    for mib in SIZES:
        r = res[str(mib)]
        lines.append(f"| {mib} | " + " | ".join(f"{r[k] * 1e3:.3f}" for k in KINDS)
                     + f" | {(r['scan, then mix'] - r['mix']) * 1e3:+.3f} | {(r['mix, then check'] - r['mix']) * 1e3:+.3f} |")
    lines += ["", "*today − mix* is what the scan really adds to a peer's receive-and-mix; *folded − mix* what "
              "checking the mix's result instead would add. The scan alone is what `wire_throughput.py` charges the "
              "exchange with: it reads the block cold from the other core, and the mix that follows then finds it "
              "in cache."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scan_in_mix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
