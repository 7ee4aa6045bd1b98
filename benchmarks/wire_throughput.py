"""Block-exchange goodput between two peer processes over loopback: our stack vs raw pyzmq vs memcpy.

For float32 blocks of 1, 4, 16, 64 and 256 MiB, one message at a time (as in a gossip exchange: send,
then wait), measured in the same run, each with its sender and receiver in separate OS processes:

* ``ours (peer exchange, blocking)``  what a peer sends and receives per exchange with the raw codec
                            (protocol v3: θ½ itself, whole): wire.encode of the block's own memory (zero-copy,
                            no sender-side NaN/Inf scan) -> Transport.send (peer A) -> Transport.recv (peer B)
                            -> wire.decode (validation, zero-copy view, NaN/Inf scan). The headline;
* ``ours + sender scan``    the same with wire.encode's default NaN/Inf check on the sender as well;
* ``ours (peer exchange, --overlap)``  the same from a snapshot of θ½ in a reused buffer (sendbuf.SnapshotPool,
                            tracked frames), as a peer sends with --overlap;
* ``v2 delta exchange``     what a peer did before (protocol v2, kept for comparison): PublicCopy.encode_block
                            of a raw delta (θ½ − θ̂ into a fresh tensor, θ̂ += delta) -> Transport ->
                            wire.decode -> the receiver's PublicCopy.apply (θ̂ += delta);
* ``raw pyzmq``             PUSH/PULL of the same bytes, send(buf, copy=False) / recv(copy=False);
* ``memcpy``                np.copyto into a warm preallocated buffer (the physical limit), and into a
                            freshly allocated torch buffer (page faults included).

Time of one message = sender's clock before encoding -> receiver's clock after decoding (CLOCK_MONOTONIC
is shared by all processes); the receiver sends its timestamps back in a small ack before the next message.
Goodput = block bytes / that time; the median over the repetitions (after one warm-up) is reported.
The whole set runs with the default glibc malloc and with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the child
processes' environment, alternating (A B A B A B: --runs 3 new process pairs each, samples pooled). Every peer
runs in the hugetlb one (`cluster`'s fork server sets it; `deca-peer start` re-executes itself into it unless the
user set GLIBC_TUNABLES: peer_env.py), so the targets apply there; the default environment is kept for comparison.
--quick: 1 and 4 MiB, 3 repetitions, one default and one hugetlb run.

    .venv/bin/python benchmarks/wire_throughput.py [--quick] [--reps N] [--runs N]

Writes benchmarks/results/wire_throughput.md and .png; prints the headline ratio last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common import RESULTS, machine_facts, reap, spawn

from deca_p2p.bootstrap import free_ports

MiB = 1 << 20

METHODS = ("raw", "ours", "ours_checked", "ours_peer", "ours_delta")
LABELS = {
    "raw": "raw pyzmq",
    "ours": "ours (peer exchange, blocking)",
    "ours_checked": "ours + sender scan",
    "ours_peer": "ours (peer exchange, --overlap)",
    "ours_delta": "v2 delta exchange",
    "copy_warm": "memcpy, warm dst",
    "copy_fresh": "memcpy, fresh torch dst",
}
ENVS = {
    "default": {},
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
RECV_IDLE_S = 60.0  # a receiver that hears nothing for this long gives up


def reps_for(size_mib: int, reps: int) -> int:
    return max(3, reps // 2) if size_mib >= 256 else reps


# ----------------------------------------------------------------------------------------- children
#
# One sender and one receiver process per environment run every method, taking turns within each repetition
# (so both see the same allocator state). Both know the schedule; the receiver answers each message with
# an ack carrying its timestamps.


def _child_setup():
    import torch

    from deca_p2p import public_copy, wire

    torch.set_num_threads(1)  # a peer gets cores / peers threads: 1 here (2 peers on 2 cores)
    return wire, public_copy


def child_send(a) -> None:
    wire, public_copy = _child_setup()
    import numpy as np
    import torch
    import zmq

    from deca_p2p.sendbuf import SnapshotPool
    from deca_p2p.transport import Transport

    now = time.monotonic
    p_data, p_ack, p_a, p_b = a.ports
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{p_data}")
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{p_ack}")
    pull.RCVTIMEO = int(RECV_IDLE_S * 1000)
    push.send(b"ping")  # the raw connection is up once the receiver answers
    pull.recv()
    tr = Transport(0, {0: f"tcp://127.0.0.1:{p_a}", 1: f"tcp://127.0.0.1:{p_b}"}, [1])
    tr.start()
    tr.barrier(0, 60.0)

    def wait_ack(method):
        if method == "raw":
            return json.loads(pull.recv())
        while True:
            got = tr.recv(RECV_IDLE_S)
            if got is None:
                raise RuntimeError("no ack from the receiver")
            msg = wire.decode(got[1])
            if msg.kind == "block" and not msg.tensors:
                return msg.stats

    out: dict[str, dict] = {m: {} for m in a.methods}
    for size in a.sizes:
        n = size * MiB // 4
        data = torch.rand(n, generator=torch.Generator().manual_seed(size))
        pcs = {m: public_copy.PublicCopy() for m in a.methods}
        pool = SnapshotPool()
        rows: dict[str, list] = {m: [] for m in a.methods}
        # methods alternate within each repetition, so a slow phase of the machine hits them alike and the
        # ratios can be taken per repetition (paired samples)
        for rep in range(1 + reps_for(size, a.reps)):  # rep 0: warm-up (and the full message of a delta chain)
            for method in a.methods:
                if method in ("ours_peer", "ours_delta"):
                    data.add_(1e-3)  # θ½ moved since the last exchange (not timed; the last message was acked)
                t0 = now()
                if method == "raw":
                    frames = [b"hdr", memoryview(data.numpy()).cast("B")]
                elif method == "ours_peer":  # as Gossip.send: a pooled snapshot, sent whole, tracked frames
                    snap = pool.snapshot({"w": data})
                    frames = pool.track(public_copy.encode_whole(snap, owned=True, src=0, step=rep, check_finite=False), snap)
                    snap = None
                elif method == "ours_delta":
                    frames = pcs[method].encode_block({"w": data}, src=0, codec="raw", full=rep == 0, step=rep,
                                                      check_finite=False)
                else:
                    frames = wire.encode(wire.Message("block", src=0, step=rep, codec="raw", full=True,
                                                      tensors={"w": data}), check_finite=method == "ours_checked")
                t_enc = now()
                if method == "raw":
                    push.send_multipart(frames, copy=False)
                else:
                    tr.send(1, frames)
                t_sent = now()
                ack = wait_ack(method)
                frames = None
                if rep:
                    rows[method].append({"t0": t0, "t_enc": t_enc, "t_sent": t_sent, "t_recv": ack["t_recv"],
                                         "t_dec": ack["t_dec"]})
        for method in a.methods:
            out[method][str(size)] = rows[method]
        del data, pcs, pool
    push.close()
    pull.close(linger=0)
    tr.close()
    ctx.term()
    # memcpy reference, in the same process and environment, after the exchange is over
    for kind in ("copy_warm", "copy_fresh"):
        out[kind] = {}
    for size in a.sizes:
        n = size * MiB // 4
        src = torch.rand(n).numpy()
        dst = np.empty_like(src)
        np.copyto(dst, src)
        warm, fresh = [], []
        for _ in range(1 + reps_for(size, a.reps)):
            t0 = now()
            np.copyto(dst, src)
            warm.append(now() - t0)
            t0 = now()
            d = torch.empty(n, dtype=torch.float32)
            np.copyto(d.numpy(), src)
            fresh.append(now() - t0)
            del d
        out["copy_warm"][str(size)] = warm[1:]
        out["copy_fresh"][str(size)] = fresh[1:]
        del src, dst
    print(json.dumps(out))


def child_recv(a) -> None:
    wire, public_copy = _child_setup()
    import zmq

    from deca_p2p.transport import Transport

    now = time.monotonic
    p_data, p_ack, p_a, p_b = a.ports
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{p_data}")
    pull.RCVTIMEO = int(RECV_IDLE_S * 1000)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"tcp://127.0.0.1:{p_ack}")
    pull.recv()  # ping
    push.send(b"{}")
    tr = Transport(1, {0: f"tcp://127.0.0.1:{p_a}", 1: f"tcp://127.0.0.1:{p_b}"}, [0])
    tr.start()
    tr.barrier(0, 60.0)
    for size in a.sizes:
        theirs = {m: public_copy.PublicCopy() for m in a.methods}
        for _ in range(1 + reps_for(size, a.reps)):
            for method in a.methods:  # the sender's order
                if method == "raw":
                    pull.recv_multipart(copy=False)
                    t_recv = now()
                    push.send(json.dumps({"t_recv": t_recv, "t_dec": t_recv}).encode())
                    continue
                while True:
                    got = tr.recv(RECV_IDLE_S)
                    if got is None:
                        raise RuntimeError("sender went silent")
                    t_recv = now()
                    msg = wire.decode(got[1])
                    if msg.kind == "block":
                        break
                if method == "ours_delta":
                    theirs[method].apply(msg.tensors, msg.full)
                t_dec = now()
                msg = got = None
                tr.send(0, wire.encode(wire.Message("block", src=1, stats={"t_recv": t_recv, "t_dec": t_dec})))
        del theirs
    tr.flush(10.0)
    pull.close(linger=0)
    push.close()
    tr.close()
    ctx.term()


# ----------------------------------------------------------------------------------------- parent


def run_child(role: str, sizes, reps, ports, env_extra: dict):
    return spawn(__file__, ["--child", role, "--reps", str(reps), "--methods", ",".join(METHODS),
                            "--sizes", ",".join(map(str, sizes)), "--ports", ",".join(map(str, ports))],
                 env_extra, env_drop=("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE"))


def measure_env(sizes, reps, env_extra: dict) -> dict:
    """Run one sender/receiver pair in this environment; returns its raw timings."""
    ports = free_ports(4)
    recv = run_child("recv", sizes, reps, ports, env_extra)
    send = run_child("send", sizes, reps, ports, env_extra)
    try:
        out, _ = send.communicate(timeout=900)
        if send.returncode:
            raise SystemExit(f"sender failed with exit code {send.returncode}")
        recv.wait(timeout=60)
    finally:
        reap((send, recv))
    return json.loads(out.strip().splitlines()[-1])


def summarize(rows: list[dict], nbytes: int) -> dict:
    med = statistics.median
    total = [r["t_dec"] - r["t0"] for r in rows]
    return {
        "gbps": nbytes / med(total) / 1e9,
        "gbps_all": [nbytes / t / 1e9 for t in total],
        "total_ms": med(total) * 1e3,
        "encode_ms": med([r["t_enc"] - r["t0"] for r in rows]) * 1e3,
        "wire_ms": med([r["t_recv"] - r["t_enc"] for r in rows]) * 1e3,  # send() + transport + zmq + recv()
        "decode_ms": med([r["t_dec"] - r["t_recv"] for r in rows]) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke test, < 30 s)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per size (after one warm-up)")
    ap.add_argument("--runs", type=int, default=3, help="sender/receiver pairs per environment (alternating)")
    ap.add_argument("--child", choices=("send", "recv"), help=argparse.SUPPRESS)
    ap.add_argument("--methods", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ports", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.sizes = [int(x) for x in a.sizes.split(",") if x]
        a.ports = [int(x) for x in a.ports.split(",") if x]
        a.methods = [m for m in a.methods.split(",") if m]
        {"send": child_send, "recv": child_recv}[a.child](a)
        return

    t_start = time.monotonic()
    load_before = os.getloadavg()
    sizes = [1, 4] if a.quick else [1, 4, 16, 64, 256]
    reps = a.reps or (3 if a.quick else 7)
    envs = list(ENVS)
    # default and hugetlb alternate (A B A B ...) so that slow phases of the shared machine hit both alike; each
    # run is a new pair of processes (where the scheduler puts them on 2 cores shifts a whole run's ratios), and the
    # samples of an environment's runs are pooled before taking medians
    schedule = envs if a.quick else envs * a.runs
    pooled: dict[str, dict] = {}
    per_run: dict[str, dict[int, list[float]]] = {}  # the headline ratio of each run, to show the spread
    for i, env_name in enumerate(schedule):
        print(f"[{i + 1}/{len(schedule)} {env_name}] sizes {sizes} MiB, methods {', '.join(METHODS)} ...", flush=True)
        raw = measure_env(sizes, reps, ENVS[env_name])
        for s in sizes:
            per_run.setdefault(env_name, {}).setdefault(s, []).append(statistics.median(
                (r["t_dec"] - r["t0"]) / (o["t_dec"] - o["t0"]) for r, o in zip(raw["raw"][str(s)], raw["ours"][str(s)])))
        acc = pooled.setdefault(env_name, {})
        for key, per_size in raw.items():
            for size, rows in per_size.items():
                acc.setdefault(key, {}).setdefault(size, []).extend(rows)
    runs = {e: schedule.count(e) for e in envs}
    results: dict[str, dict[str, dict[int, dict]]] = {}
    for env_name, raw in pooled.items():
        res = results[env_name] = {m: {s: summarize(raw[m][str(s)], s * MiB) for s in sizes} for m in METHODS}
        for m in METHODS:  # the ratio to raw pyzmq: median over repetitions of the paired (same-repetition) ratio
            for s in sizes:
                res[m][s]["ratio"] = statistics.median(
                    (r["t_dec"] - r["t0"]) / (o["t_dec"] - o["t0"]) for r, o in zip(raw["raw"][str(s)], raw[m][str(s)]))
        for kind in ("copy_warm", "copy_fresh"):
            res[kind] = {s: {"gbps": s * MiB / statistics.median(raw[kind][str(s)]) / 1e9} for s in sizes}
    wall = time.monotonic() - t_start
    write_report(a, results, sizes, reps, envs, wall, (load_before, os.getloadavg()), runs, per_run)


# ----------------------------------------------------------------------------------------- report


def write_report(a, results, sizes, reps, envs, wall, loads, runs, per_run) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/wire_throughput.py" + (" --quick" if a.quick else "") + \
        (f" --reps {a.reps}" if a.reps else "") + (f" --runs {a.runs}" if a.runs != 3 else "")
    L = ["# Block exchange goodput over loopback: our stack vs raw pyzmq vs memcpy", "",
         f"Command: `{cmd}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall; 1-min load average {loads[0][0]:.1f} before, "
         f"{loads[1][0]:.1f} after (the two benchmark processes themselves load up to 2 cores); the raw samples "
         "are at the end.", "",
         "One float32 block (a single tensor) per message, one message in flight at a time (a gossip exchange "
         "sends, then waits); sender and receiver are separate processes with 1 torch thread each (as a peer on "
         "this box). Time = sender clock before encoding -> receiver clock after decoding; goodput = block bytes / "
         f"time (sizes in MiB, rates in GB/s = 1e9 B/s); median of {reps} repetitions per run ({reps_for(256, reps)} "
         "at 256 MiB) after one warm-up. The methods take turns within every repetition, in the same pair of "
         "processes, and each ratio to raw pyzmq (x) is the median of the per-repetition ratios (paired samples: "
         "this machine's speed drifts by 2-3x within seconds, see the raw samples). Each "
         "environment runs in its own pair; " + ", ".join(f"{e}: {n} run(s)" for e, n in runs.items()) +
         (" (they alternate, A B A B ..., and their samples are pooled)." if max(runs.values()) > 1 else "."), "",
         "- **raw pyzmq**: PUSH/PULL, `send_multipart([hdr, buf], copy=False)` / `recv_multipart(copy=False)`, same bytes.",
         "- **ours (peer exchange, blocking)** (the headline): what a peer sends and receives per exchange with the "
         "raw codec (protocol v3: θ½ itself, whole): `wire.encode(..., check_finite=False)` of the block's own memory "
         "(zero-copy: the mix then gives the parameters new storage, `optim._set_params`) -> `Transport.send` -> "
         "`Transport.recv` -> `wire.decode` (header validation, a zero-copy view of the frame, the NaN/Inf check); the "
         "receiver mixes that view and keeps nothing per neighbour. Peers skip the sender-side scan: every receiver "
         "validates, and a peer's own divergence stops it at its loss (`TrainingDiverged`). Targets (issue 12): "
         ">= 0.8x raw pyzmq at 4-256 MiB, >= 0.5x at 1 MiB, in the hugetlb environment: every peer runs in it "
         "(`cluster`'s fork server sets it, and `deca-peer start` re-executes itself into it unless the user set "
         "GLIBC_TUNABLES, `deca_p2p/peer_env.py`); the default environment is shown for comparison.",
         "- **ours + sender scan**: the same with `wire.encode`'s default NaN/Inf check on the sender too.",
         "- **ours (peer exchange, --overlap)**: with `--overlap` the parameters change while the block travels, so a "
         "copy goes out: `SnapshotPool.snapshot` (θ½ copied into a spare buffer ZeroMQ has released, else a fresh "
         "one) -> `public_copy.encode_whole` -> tracked frames -> Transport -> `wire.decode`.",
         "- **v2 delta exchange**: the path before (protocol v2): `PublicCopy.encode_block` of a raw delta (θ½ − θ̂ into "
         "a fresh tensor, θ̂ += delta) -> Transport -> `wire.decode` -> the receiver's `PublicCopy.apply` (θ̂ += delta).",
         "- **memcpy**: `np.copyto` into a warm preallocated buffer (the physical limit) / into a fresh "
         "`torch.empty` buffer (page faults included).", ""]
    for env in envs:
        res = results[env]
        desc = ", ".join(f"`{k}={v}`" for k, v in ENVS[env].items()) or "glibc malloc defaults"
        L += [f"## Environment: {env} ({desc})", "",
              "| block MiB | " + " | ".join(f"{LABELS[m]} GB/s" + ("" if m == "raw" else " (/ raw)") for m in METHODS) +
              " | memcpy warm GB/s | memcpy fresh GB/s |", "|---:" * (len(METHODS) + 3) + "|"]
        for s in sizes:
            r = res["raw"][s]["gbps"]
            cells = [f"{r:.2f}"]
            for m in METHODS[1:]:
                x, q = res[m][s]["gbps"], res[m][s]["ratio"]
                cells.append(f"{x:.2f} (**{q:.2f}x**)" if m == "ours" else f"{x:.2f} ({q:.2f}x)")
            L.append(f"| {s} | " + " | ".join(cells) +
                     f" | {res['copy_warm'][s]['gbps']:.2f} | {res['copy_fresh'][s]['gbps']:.2f} |")
        L += ["", "Where the time goes (median ms per message; encode = before `send()`; wire = `send()` + the "
              "transport's sender thread + zmq + `recv()` returning; decode = `wire.decode` (+ `PublicCopy.apply` "
              "for the peer exchange)):", "",
              "| block MiB | method | total ms | encode ms | wire ms | decode ms |", "|---:|---|---:|---:|---:|---:|"]
        for s in sizes:
            for m in METHODS:
                x = res[m][s]
                L.append(f"| {s} | {LABELS[m]} | {x['total_ms']:.1f} | {x['encode_ms']:.1f} | {x['wire_ms']:.1f} | "
                         f"{x['decode_ms']:.1f} |")
        L.append("")
    L += diagnosis(results, sizes, envs)
    if "hugetlb" in envs and "default" in envs:
        L += ["## Does `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` help?", "",
              "| block MiB | " + " | ".join(f"{LABELS[m]}: default -> hugetlb GB/s" for m in METHODS) + " |",
              "|---:" + "|---" * len(METHODS) + "|"]
        for s in sizes:
            cells = []
            for m in METHODS:
                d, h = results["default"][m][s]["gbps"], results["hugetlb"][m][s]["gbps"]
                cells.append(f"{d:.2f} -> {h:.2f} (x{h / d:.2f})")
            L.append(f"| {s} | " + " | ".join(cells) + " |")
        L += ["", verdict(results, sizes), ""]
    L += ["## The headline ratio run by run", "", "Each run is a new sender/receiver pair; ours (peer exchange, "
          "blocking) / raw pyzmq, median of that run's paired repetitions:", "",
          "| environment | " + " | ".join(f"{s} MiB" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for env in envs:
        L.append(f"| {env} | " + " | ".join(", ".join(f"{x:.2f}" for x in per_run[env][s]) for s in sizes) + " |")
    L += ["", "## Headline", "", headline(results, sizes, envs), ""]
    L += ["## Raw samples (GB/s per repetition)", ""]
    for env in envs:
        for m in METHODS:
            L.append(f"- {env} / {LABELS[m]}: " + "; ".join(
                f"{s} MiB: " + ", ".join(f"{x:.2f}" for x in results[env][m][s]["gbps_all"]) for s in sizes))
    L.append("")
    (RESULTS / "wire_throughput.md").write_text("\n".join(L))
    plot(results, sizes, envs)
    print("\n".join(L))
    print(headline(results, sizes, envs))


def diagnosis(results, sizes, envs) -> list[str]:
    env = "hugetlb" if "hugetlb" in envs else envs[0]
    r = results[env]
    L = ["## Where our stack loses to raw pyzmq", "",
         f"In the `{env}` environment (the one every peer runs in), per message, ours minus raw pyzmq:", "",
         "| block MiB | extra ms | of which encode | wire | decode (validation + NaN/Inf check) | "
         "sender scan would add ms |", "|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        o, raw, chk = r["ours"][s], r["raw"][s], r["ours_checked"][s]
        L.append(f"| {s} | {o['total_ms'] - raw['total_ms']:.2f} | {o['encode_ms'] - raw['encode_ms']:.2f} | "
                 f"{o['wire_ms'] - raw['wire_ms']:.2f} | {o['decode_ms'] - raw['decode_ms']:.2f} | "
                 f"{chk['encode_ms'] - o['encode_ms']:.2f} |")
    L += ["", "Raw pyzmq never reads the bytes it receives; a peer must, once, to reject NaN/Inf from an untrusted "
          "neighbour (a float32 sum at memory speed, with an exact aminmax pass only when the sum is not finite). "
          "That read is the decode column for large blocks; for small blocks the gap is a fixed per-message cost "
          "(msgpack header build and validation, the hand-off to the link's sender thread, the ROUTER's extra "
          "routing-id frame).", ""]
    return L


def _geo(xs) -> float:
    xs = list(xs)
    return statistics.geometric_mean(xs) if xs else float("nan")


def verdict(results, sizes) -> str:
    big = [s for s in sizes if s >= 64] or sizes  # real blocks: a 7-8B model's decoder layer is ~0.8 GB in fp32
    parts = []
    for m in ("raw", "ours", "ours_peer"):
        g = _geo(results["hugetlb"][m][s]["gbps"] / results["default"][m][s]["gbps"] for s in big)
        gall = _geo(results["hugetlb"][m][s]["gbps"] / results["default"][m][s]["gbps"] for s in sizes)
        parts.append(f"{LABELS[m]} x{g:.2f} on blocks >= {big[0]} MiB (x{gall:.2f} over all sizes)")
    g_ref = _geo(results["hugetlb"][m][s]["gbps"] / results["default"][m][s]["gbps"] for m in ("raw", "ours") for s in big)
    word = "**Yes, it helps**" if g_ref > 1.1 else ("**No clear effect**" if g_ref > 0.95 else "**No, it hurts**")
    return (f"{word}: geometric-mean goodput speed-up with the tunable: " + "; ".join(parts) +
            f" (verdict from raw pyzmq and ours on blocks >= {big[0]} MiB: x{g_ref:.2f}). Buffers of >= 32 MiB come "
            "straight from mmap (glibc's dynamic threshold stops there), so every large message page-faults a "
            "fresh buffer in; with the tunable those are 2 MiB pages (compare the memcpy fresh column).")


def headline(results, sizes, envs) -> str:
    parts = []
    for env in envs:
        for m in ("ours", "ours_peer", "ours_delta"):
            rs = [results[env][m][s]["ratio"] for s in sizes]
            parts.append(f"{env} {LABELS[m]}: " + ", ".join(f"{s} MiB {x:.2f}x" for s, x in zip(sizes, rs)))
    return ("HEADLINE goodput / raw pyzmq [peer exchange targets: >= 0.8x at 4-256 MiB, >= 0.5x at 1 MiB, in the "
            "hugetlb environment every peer runs in]: " +
            "; ".join(parts))


def plot(results, sizes, envs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(5.4 * len(envs), 5.0), sharey=True, squeeze=False)
    styles = {"raw": ("tab:blue", "o-"), "ours": ("tab:red", "s-"), "ours_checked": ("tab:purple", "s--"),
              "ours_peer": ("tab:orange", "^-"), "ours_delta": ("tab:brown", "v:"), "copy_warm": ("black", "x-"), "copy_fresh": ("tab:green", "d-")}
    for ax, env in zip(axes[0], envs):
        for m, (color, fmt) in styles.items():
            ax.plot(sizes, [results[env][m][s]["gbps"] for s in sizes], fmt, color=color, label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("block size (MiB, float32)")
        ax.set_title(env, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("goodput (GB/s, median)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Block exchange between two processes over tcp://127.0.0.1")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(RESULTS / "wire_throughput.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
