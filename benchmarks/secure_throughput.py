"""What --secure (ZeroMQ CURVE) costs: goodput of block transfers between two Transports over loopback.

Two OS processes (peer 0 and peer 1), each with a real ``deca_p2p.transport.Transport`` on tcp://127.0.0.1,
once plain and once with CURVE (keypairs made here, allow-list = both keys, as with ``deca-peer keys``).
For each block size (default 1, 16, 64 MB of payload, sent zero-copy as one frame behind a small header):

* one-way: peer 1 sends N blocks back to back (N*S about 128 MB, 4 <= N <= 32), peer 0 answers with a small
  ack once it has them all; goodput = N*S / (time from the first send to the ack);
* exchange: both peers send their block at once and wait for the other's (one gossip exchange, both
  directions busy); goodput = S / exchange time, as seen by peer 0.

Each is repeated (``--repeats``, after one warm-up) and the median is reported.  Plain and CURVE pairs run
side by side and take turns rep by rep, so both see the same background load; the CPU time both processes
spent (all threads: libzmq's I/O threads encrypt and decrypt) per GB is reported too, as it depends far less
on what else the machine is doing.  Link emulation is off.

    .venv/bin/python benchmarks/secure_throughput.py [--sizes-mb 1,16,64] [--repeats 5]

Writes benchmarks/results/secure_throughput.md and .png; prints the CURVE/plain ratio last.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from deca_p2p.bootstrap import free_ports  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ONE_WAY_BYTES = 128 << 20
MAX_BURST = 32  # the transport keeps at most 64 messages queued per link (it drops the oldest beyond)


def _await(tr, tag: bytes, timeout_s: float = 120.0):
    """Frames of the next message from the other peer whose header is ``tag`` (others are discarded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {tag!r} within {timeout_s} s")
        r = tr.recv(left)
        if r is None:
            continue
        src, frames = r
        if src == 1 - tr.my_id and frames and frames[0].bytes == tag:
            return frames


def _worker(me: int, eps: dict, keys: dict | None, cmds, results) -> None:
    """One peer: a Transport (plain or CURVE) that runs the transfers the parent asks for, one at a time."""
    from deca_p2p.transport import CurveConfig, Transport

    curve = None
    if keys is not None:
        curve = CurveConfig(keys[me][0], keys[me][1], {i: k[0] for i, k in keys.items()})
    other = 1 - me
    tr = Transport(me, eps, [other], send_timeout_s=60.0, linger_ms=2000, curve=curve)
    tr.start()
    payloads: dict[int, np.ndarray] = {}
    try:
        tr.barrier(inc=1, timeout_s=60.0)
        results.put((me, "ready", 0, 0, 0.0, 0.0))
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                break
            kind, size, rep = cmd
            if size not in payloads:  # never mutated while queued (zero-copy send)
                payloads[size] = np.full(size, me + 1, dtype=np.uint8)
            payload = payloads[size]
            tag = f"{kind} {size} {rep}".encode()
            t0, c0 = time.perf_counter(), time.process_time()  # process time: every thread, libzmq's I/O thread too
            if kind == "ow":
                n = min(MAX_BURST, max(4, ONE_WAY_BYTES // size))
                if me == 1:  # sender
                    for _ in range(n):
                        tr.send(0, [tag, payload])
                    _await(tr, b"ack " + tag)
                else:
                    for k in range(n):
                        frames = _await(tr, tag)
                        if k == 0:
                            t0, c0 = time.perf_counter(), time.process_time()
                        assert len(frames[1]) == size
                        del frames
                    tr.send(1, [b"ack " + tag])
                    tr.flush(30.0)
                nbytes = n * size
            else:  # exchange
                tr.send(other, [tag, payload])
                frames = _await(tr, tag)
                assert len(frames[1]) == size and frames[1].bytes[:1] == bytes([other + 1])
                del frames
                tr.flush(30.0)
                nbytes = size
            results.put((me, kind, size, nbytes, time.perf_counter() - t0, time.process_time() - c0))
    finally:
        tr.flush(10.0)
        tr.close(send_bye=False)


class _Pair:
    """Two peer processes, plain or CURVE (keypairs made here; the allow-list is both keys)."""

    def __init__(self, secure: bool):
        ctx = mp.get_context("spawn")
        keys = {i: zmq.curve_keypair() for i in range(2)} if secure else None
        eps = {i: f"tcp://127.0.0.1:{p}" for i, p in enumerate(free_ports(2))}
        self.results = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(2)]
        self.procs = [ctx.Process(target=_worker, args=(i, eps, keys, self.cmds[i], self.results), daemon=True)
                      for i in range(2)]
        for p in self.procs:
            p.start()
        for _ in range(2):
            self.results.get(timeout=300)

    def run(self, kind: str, size: int, rep: int) -> dict[int, tuple]:
        for q in self.cmds:
            q.put((kind, size, rep))
        out = {}
        for _ in range(2):
            me, _, _, nbytes, wall, cpu = self.results.get(timeout=300)
            out[me] = (nbytes, wall, cpu)
        return out

    def close(self) -> None:
        for q in self.cmds:
            q.put(("stop",))
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def measure(sizes: list[int], repeats: int) -> dict:
    """{mode: {pattern: {size: [(goodput B/s, CPU s per GB on both peers), ...]}}}, plain and CURVE interleaved
    rep by rep (alternating which goes first), so that both see the same background load."""
    pairs = {"plain": _Pair(False), "curve": _Pair(True)}
    res = {m: {"one_way": {}, "exchange": {}} for m in pairs}
    try:
        for size in sizes:
            for kind, pattern in (("ow", "one_way"), ("ex", "exchange")):
                for rep in range(repeats + 1):
                    order = ("plain", "curve") if rep % 2 else ("curve", "plain")
                    for m in order:
                        out = pairs[m].run(kind, size, rep)
                        nbytes, wall, _ = out[1] if kind == "ow" else out[0]  # one-way: the sender's clock
                        cpu = out[0][2] + out[1][2]
                        moved = nbytes if kind == "ow" else 2 * nbytes  # an exchange delivers S each way
                        if rep:  # rep 0 warms up
                            res[m][pattern].setdefault(size, []).append((nbytes / wall, cpu / (moved / 1e9)))
    finally:
        for p in pairs.values():
            p.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if not zmq.has("curve"):
        raise SystemExit("error: this libzmq has no CURVE support")
    sizes = [int(float(x) * (1 << 20)) for x in a.sizes_mb.split(",")]
    t_start = time.time()
    load0 = os.getloadavg()[0]
    raw = measure(sizes, a.repeats)
    load1 = os.getloadavg()[0]
    results = {m: {p: {sz: [r[0] for r in v] for sz, v in raw[m][p].items()} for p in raw[m]} for m in raw}
    cpu = {m: {p: {sz: statistics.median(r[1] for r in v) for sz, v in raw[m][p].items()} for p in raw[m]} for m in raw}
    med = {m: {p: {s: statistics.median(v) / 1e9 for s, v in results[m][p].items()} for p in ("one_way", "exchange")}
           for m in results}
    spread = {m: {p: {s: (min(v) / 1e9, max(v) / 1e9) for s, v in results[m][p].items()} for p in ("one_way", "exchange")}
              for m in results}

    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# --secure (ZeroMQ CURVE) vs plain: goodput between two peer processes on loopback",
        "",
        f"`benchmarks/secure_throughput.py --sizes-mb {a.sizes_mb} --repeats {a.repeats}`; "
        f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"python {platform.python_version()}; GB/s = 1e9 bytes of payload per second, median of {a.repeats} "
        "(min–max in brackets). Two `Transport`s in separate processes, tcp://127.0.0.1, zero-copy sends, "
        "no link emulation, default malloc.",
        "",
        "One-way: peer 1 sends N blocks back to back (N·S ≈ 128 MB, 4 ≤ N ≤ 32), peer 0 acks the last. "
        "Exchange: both peers send their block at once and wait for the other's (one gossip exchange); "
        "goodput = S / exchange time. Plain and CURVE take turns rep by rep (same background load). "
        "CPU s/GB: process CPU time of both peers (every thread, libzmq's I/O threads included) per GB delivered "
        "(an exchange delivers S each way), median.",
        "",
        f"Load average while measuring: {load0:.1f} at the start, {load1:.1f} at the end "
        f"({os.cpu_count()} cores; other jobs share this machine, so absolute GB/s are noisy — the ratios and CPU "
        "costs are the robust numbers).",
        "",
        "| block | pattern | plain GB/s | CURVE GB/s | CURVE / plain | CPU s/GB plain | CPU s/GB CURVE |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p, label in (("one_way", "one-way"), ("exchange", "exchange")):
        for s in sizes:
            pl, cu = med["plain"][p][s], med["curve"][p][s]
            (pl0, pl1), (cu0, cu1) = spread["plain"][p][s], spread["curve"][p][s]
            lines.append(f"| {s / (1 << 20):g} MB | {label} | {pl:.2f} [{pl0:.2f}–{pl1:.2f}] | "
                         f"{cu:.2f} [{cu0:.2f}–{cu1:.2f}] | {cu / pl:.2f} | {cpu['plain'][p][s]:.2f} | "
                         f"{cpu['curve'][p][s]:.2f} |")
    big = max(sizes)
    ratio = med["curve"]["one_way"][big] / med["plain"]["one_way"][big]
    ratio_ex = med["curve"]["exchange"][big] / med["plain"]["exchange"][big]
    lines += [
        "",
        f"At {big / (1 << 20):g} MB, CURVE delivers {ratio:.2f}× the plain goodput one-way "
        f"({1 / ratio:.1f}× slower; {med['curve']['one_way'][big] * 8:.1f} Gbit/s) and {ratio_ex:.2f}× in an exchange. "
        f"Encryption costs {cpu['curve']['one_way'][big]:.2f} CPU s per GB against {cpu['plain']['one_way'][big]:.2f} "
        "plain (sender + receiver). CURVE encrypts every frame (XSalsa20-Poly1305) in libzmq's I/O thread, one "
        "per process, so a link is bounded by one core's encryption speed; with the 2 cores of this machine both "
        "directions of an exchange compete for them.",
        "",
        f"Total benchmark time: {time.time() - t_start:.0f} s.",
        "",
    ]
    (RESULTS / "secure_throughput.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    x = np.arange(len(sizes))
    for ax, (p, label) in zip(axes, (("one_way", "one-way stream"), ("exchange", "block exchange (both ways)"))):
        for k, m in enumerate(("plain", "curve")):
            vals = [med[m][p][s] for s in sizes]
            err = np.array([[med[m][p][s] - spread[m][p][s][0] for s in sizes],
                            [spread[m][p][s][1] - med[m][p][s] for s in sizes]])
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3,
                   label="plain" if m == "plain" else "--secure (CURVE)")
        ax.set_xticks(x, [f"{s / (1 << 20):g} MB" for s in sizes])
        ax.set_title(label)
        ax.set_xlabel("block size")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("goodput (GB/s, median)")
    axes[0].legend()
    fig.suptitle("Loopback goodput between two peer processes: plain vs CURVE")
    fig.tight_layout()
    fig.savefig(RESULTS / "secure_throughput.png", dpi=110)
    for s in sizes:
        print(f"{s / (1 << 20):g} MB: one-way plain {med['plain']['one_way'][s]:.2f} GB/s, curve "
              f"{med['curve']['one_way'][s]:.2f} GB/s; exchange plain {med['plain']['exchange'][s]:.2f} GB/s, "
              f"curve {med['curve']['exchange'][s]:.2f} GB/s")
    print(f"CPU s/GB at {big / (1 << 20):g} MB one-way: plain {cpu['plain']['one_way'][big]:.2f}, "
          f"curve {cpu['curve']['one_way'][big]:.2f}; load average {load0:.1f} -> {load1:.1f}")
    print(f"CURVE/plain goodput ratio at {big / (1 << 20):g} MB: one-way {ratio:.2f} ({1 / ratio:.1f}x slower), "
          f"exchange {ratio_ex:.2f}")


if __name__ == "__main__":
    main()
