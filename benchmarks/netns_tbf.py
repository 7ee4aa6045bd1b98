"""A kernel-shaped link against the in-process link emulator: real peers on separate hosts (network namespaces).

    .venv/bin/python benchmarks/netns_tbf.py [--quick] [--rate MBIT]   (as root: it makes network namespaces)

Builds Linux network namespaces ``deca-<tag>-<i>``, each with its own address (``eth0`` = 10.231.X.<i+1>/24, a veth
into a bridge that lives in a namespace of its own, ``deca-<tag>-br``: nothing is added to the root namespace),
and runs a ring of 2 real ``deca-peer start`` processes, one per namespace, on the bootstrap file that
``deca-peer bootstrap --hosts`` writes for those addresses. Twice, alternately:

* **kernel**: the peers emulate nothing (the topology's link is unlimited); both hosts' ``eth0`` are shaped by the
  kernel, ``tc qdisc add dev eth0 root tbf rate 100mbit burst 32kbit latency 50ms`` inside each namespace, so the
  link is 100 Mbit/s in each direction (netem is absent from these kernels; tbf works in a namespace);
* **emulated**: no qdisc; the topology's link says ``bandwidth_mbps: 100`` and the peers' own sender threads
  emulate it (link.py).

``--rate R`` runs both at R Mbit/s instead (the bucket grows with R) and writes netns_tbf_<R>mbit.md: at 1 Gbit/s,
whether the emulator's goodput is above or below what a kernel-shaped link gives the same peers.

Both runs measure the median inner-step wall time and the median goodput of block messages sent after their
receiver had begun its exchange (``bandwidth_latency.measure``); the step times are compared at equal compute (see
``summary``: what else runs on the machine changes the compute, not the link). Writes
benchmarks/results/netns_tbf.md.
``tests/test_netns.py`` uses the same code (``NetnsLab``, ``netns_unavailable``, ``run_peers``, ``shaped_vs_emulated``).
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bandwidth_latency import measure  # noqa: E402
from common import reap  # noqa: E402
from deca_p2p.metrics import read_metrics  # noqa: E402
from deca_p2p.topology import generate  # noqa: E402

RATE_MBIT = 100  # the default rate (--rate): the one tests/test_netns.py and netns_tbf.md use


def tbf(rate_mbit: float) -> list[str]:
    """The qdisc for ``rate_mbit``: a bucket of 4 KB per 100 Mbit/s (32kbit at 100), so that the bucket never holds
    more than ~0.3 ms of the link's bytes whatever the rate."""
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", f"{max(32, round(32 * rate_mbit / 100))}kbit",
            "latency", "50ms"]
PORT = 5550  # every peer has a host (namespace) of its own: the same port everywhere
# the link runs: layer blocks only, so every block message has the same size S (one decoder layer, float32)
LINK_ARGS = ["--rounds", "1", "--threads", "1", "--seed", "0", "--set", "embeddings_block=false",
             "--set", "head_block=false", "--set", "train_per_task=300", "--set", "eval_per_task=4"]


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message names the command and its error."""


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if p.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip() or f'exit {p.returncode}'}")
    return p.stdout


def netns_unavailable() -> str | None:
    """None where network namespaces can be made here (root, iproute2, permitted), else the one-line reason."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"deca-probe-{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", probe)
    except NetnsError as e:
        return f"network namespaces are not permitted here ({e})"
    try:
        _run("ip", "-n", probe, "link", "add", "vprobe0", "type", "veth", "peer", "name", "vprobe1")
    except NetnsError as e:
        return f"veth pairs are not permitted here ({e})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NetnsLab:
    """``n`` hosts: namespaces deca-<tag>-<i> with eth0 = ``addr(i)`` on one bridge (namespace deca-<tag>-br).

    A context manager: leaving it kills the processes started through ``popen`` and deletes every namespace
    it made (which removes their veths and the bridge), also after an error half-way through building them.
    """

    def __init__(self, n: int):
        self.n = n
        self.tag = secrets.token_hex(3)
        self.subnet = random.randrange(1, 255)  # 10.231.<subnet>.0/24: each lab its own (namespaces isolate anyway)
        self.bridge_ns = f"deca-{self.tag}-br"
        self.names = [f"deca-{self.tag}-{i}" for i in range(n)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def addr(self, i: int) -> str:
        return f"10.231.{self.subnet}.{i + 1}"

    def __enter__(self) -> "NetnsLab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        br = self.bridge_ns
        _run("ip", "netns", "add", br)
        self._made.append(br)
        _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", br, "link", "set", f"v{i}", "master", "br0")
            _run("ip", "-n", br, "link", "set", f"v{i}", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        reap(self._procs)
        self._procs.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *map(str, argv)]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.exec_argv(i, argv), **kw)
        self._procs.append(p)
        return p

    def shape(self, i: int, rate_mbit: float = RATE_MBIT) -> None:
        """Host i's eth0 egress at ``rate_mbit`` by the kernel's token bucket filter."""
        _run(*self.exec_argv(i, ["tc", "qdisc", "replace", "dev", "eth0", "root", *tbf(rate_mbit)]))

    def unshape(self, i: int) -> None:
        subprocess.run(self.exec_argv(i, ["tc", "qdisc", "del", "dev", "eth0", "root"]), capture_output=True)

    def qdisc_stats(self, i: int) -> str:
        return " ".join(_run(*self.exec_argv(i, ["tc", "-s", "qdisc", "show", "dev", "eth0"])).split())

    def listening(self, i: int) -> list[str]:
        """Local addresses of the TCP sockets listening in host i (``ss -ltn``)."""
        out = _run(*self.exec_argv(i, ["ss", "-Hltn"]))
        return [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def write_bootstrap(lab: NetnsLab, topo_path: Path, out: Path, ids: Sequence[int]) -> Path:
    """``deca-peer bootstrap --topology T --hosts <host of each id>``: peer i listens on tcp://addr(i):PORT."""
    p = subprocess.run([sys.executable, "-m", "deca_p2p.cli", "bootstrap", "--topology", str(topo_path),
                        "--hosts", ",".join(lab.addr(i) for i in sorted(ids)), "--base-port", str(PORT)],
                       capture_output=True, text=True, env=peer_env(), cwd=REPO)
    if p.returncode != 0:
        raise NetnsError(f"deca-peer bootstrap failed: {p.stderr.strip()}")
    out.write_text(p.stdout)
    return out


def run_peers(lab: NetnsLab, topo_path: Path, ids: Sequence[int], run_dir: Path, args: Sequence[str],
              timeout: float = 300, while_running: Callable[[list[subprocess.Popen]], None] | None = None
              ) -> tuple[list[int], list[str]]:
    """Start ``deca-peer start --id i`` in host i for every id (bootstrap file from ``write_bootstrap``), wait for
    all; returns their exit codes (None: killed at the timeout) and outputs. ``while_running(procs)`` is called
    once they are started."""
    run_dir.mkdir(parents=True, exist_ok=True)
    bs = write_bootstrap(lab, topo_path, run_dir.parent / f"{run_dir.name}-bootstrap.json", ids)
    logs = [run_dir.parent / f"{run_dir.name}-peer{i}.out" for i in ids]
    procs = []
    for i, log in zip(ids, logs):
        with open(log, "wb") as f:
            procs.append(lab.popen(i, [sys.executable, "-m", "deca_p2p.cli", "start", "--id", i, "--neighbors",
                                       topo_path, "--bootstrap", bs, "--run-dir", run_dir, *args],
                                   stdout=f, stderr=subprocess.STDOUT, env=peer_env(), cwd=run_dir.parent))
    if while_running is not None:
        while_running(procs)
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes, [log.read_text(errors="replace") for log in logs]


def shaped_vs_emulated(lab: NetnsLab, tmp: Path, inner_steps: int, repeats: int = 1,
                       log: Callable[[str], None] = lambda s: None, rate_mbit: float = RATE_MBIT) -> dict:
    """Ring of 2 (hosts 0 and 1): ``repeats`` runs each of the kernel-shaped link and the emulated one, alternately,
    both at ``rate_mbit``.

    Returns {"kernel": [measure...], "emulated": [...], "qdisc": tc statistics after the last kernel run,
    "raw_tcp": plain TCP's goodput over the shaped link one way and both ways (``raw_tcp_goodput``, messages of the
    peers' size)}.
    A run that fails raises NetnsError with the peers' output."""
    free = tmp / "ring2-unlimited.json"
    free.write_text(generate("ring", 2).to_json())
    emulated = tmp / f"ring2-{rate_mbit:g}mbit.json"
    emulated.write_text(generate("ring", 2, link={"bandwidth_mbps": rate_mbit}).to_json())
    out: dict = {"kernel": [], "emulated": [], "qdisc": [], "raw_tcp": None, "load": os.getloadavg(),
                 "rate_mbit": rate_mbit}
    args = [*LINK_ARGS, "--inner-steps", str(inner_steps)]
    for k in range(repeats):
        for mode in ("kernel", "emulated"):
            run_dir = tmp / f"{mode}-{k}"
            if mode == "kernel":
                lab.shape(0, rate_mbit)
                lab.shape(1, rate_mbit)
            try:
                codes, outs = run_peers(lab, free if mode == "kernel" else emulated, [0, 1], run_dir, args)
                if mode == "kernel":
                    out["qdisc"] = [lab.qdisc_stats(0), lab.qdisc_stats(1)]
            finally:
                lab.unshape(0)
                lab.unshape(1)
            if codes != [0, 0]:
                raise NetnsError(f"{mode} run {k}: peers exited {codes}:\n" + "\n".join(o[-2000:] for o in outs))
            stopped = [i for i, recs in read_metrics(run_dir).items()
                       if any(r.get("event") == "final" and r.get("stopped") for r in recs)]
            if stopped:  # exit 0 after SIGTERM/SIGINT: not a run to measure
                raise NetnsError(f"{mode} run {k}: peer(s) {stopped} were stopped by a signal from outside the run")
            r = {**measure(run_dir, 0.0, rate_mbit), "net": network_share(run_dir)}
            out[mode].append(r)
            log(f"{mode} run {k}: step {r['step_wall']:.4f} s (link share {r['net']:.4f} s), goodput "
                f"{r['goodput']:.1f} Mbit/s ({r['n_goodput']} messages), compute {r['compute']:.4f} s, "
                f"S {r['S'] / 1e6:.3f} MB")
    lab.shape(0, rate_mbit)
    lab.shape(1, rate_mbit)
    try:
        out["raw_tcp"] = {w: raw_tcp_goodput(lab, int(out["kernel"][0]["S"]), w == "both", rate_mbit)
                          for w in ("one", "both")}
    finally:
        lab.unshape(0)
        lab.unshape(1)
    log(f"plain TCP over the tbf link: {out['raw_tcp']['one']:.1f} Mbit/s one way, {out['raw_tcp']['both']:.1f} "
        "both ways at once")
    return out


_RAW_TCP = r"""
import socket, statistics, struct, sys, time
mode, host, port, size, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "server":  # prints the median one-way time: sent (the client's stamp) to fully received, one clock
    # (CLOCK_MONOTONIC: network namespaces share it)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(1)
    print("ready", flush=True)
    c, _ = ls.accept()
    ts, data = [], bytearray(8 + size)
    view = memoryview(data)
    for _ in range(n):
        got = 0
        while got < len(data):
            k = c.recv_into(view[got:])
            if not k:
                sys.exit(1)
            got += k
        ts.append(time.monotonic() - struct.unpack(">d", data[:8])[0])
    print(statistics.median(ts[3:]), flush=True)
else:
    start, period = float(sys.argv[6]), float(sys.argv[7])
    c = socket.create_connection((host, port))
    buf = bytearray(8 + size)
    for k in range(n):
        while time.monotonic() < start + k * period:  # both directions on one grid: sent at the same moments
            time.sleep(0.0005)
        struct.pack_into(">d", buf, 0, time.monotonic())
        c.sendall(buf)
    time.sleep(1.0)
"""


def raw_tcp_goodput(lab: NetnsLab, size: int, both_ways: bool, rate_mbit: float, n: int = 24) -> float:
    """Mbit/s (median) of plain TCP moving ``size``-byte messages from host 0 to host 1 (``both_ways``: and from 1 to
    0 at the same moments, as the two peers of a ring send their blocks), from the sender's stamp to the last byte
    read (both hosts share this machine's clock): what the link as it is now (shaped or not) gives, without ZeroMQ
    or a peer."""
    argv = [sys.executable, "-c", _RAW_TCP]
    pairs = [(0, 1), (1, 0)] if both_ways else [(0, 1)]
    servers = [lab.popen(dst, [*argv, "server", lab.addr(dst), PORT + 1, size, n], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True) for _, dst in pairs]
    try:
        for srv in servers:
            srv.stdout.readline()  # "ready": listening
        # one clock for both namespaces: message k leaves at start + k * period, 60 ms + 1.5 S/R apart (a transfer
        # takes ~S/R; the half S/R to spare keeps a slow one from pushing its sender off the grid)
        grid = [time.monotonic() + 1.0, 0.06 + 1.5 * size * 8 / (rate_mbit * 1e6)]
        clients = [lab.popen(src, [*argv, "client", lab.addr(dst), PORT + 1, size, n, *grid], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for src, dst in pairs]
        errs = [c.communicate(timeout=120)[1] for c in clients]  # they end ~1 s after their last message
        rates = []
        for srv, c, err in zip(servers, clients, errs):
            try:
                out, srv_err = srv.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                out, srv_err = "", "the receiver was still waiting"
            if srv.returncode != 0 or c.returncode != 0:
                raise NetnsError(f"raw TCP transfer failed: sender: {err.strip()[-300:]}; "
                                 f"receiver: {(srv_err or '').strip()[-300:]}")
            rates.append(size * 8 / float(out.split()[-1]) / 1e6)
        return statistics.median(rates)
    finally:
        for srv in servers:
            srv.kill()
            srv.wait()


def network_share(run_dir: Path) -> float:
    """Median over the peers' inner steps of (step wall time − that step's own compute): what the link adds to a
    step (waiting for the neighbour's block, encoding and mixing), free of how fast this machine computed."""
    net = []
    for recs in read_metrics(run_dir).values():
        steps = [r for r in recs if r.get("event") == "step"]
        net += [r["time"] - prev["time"] - r["compute_s"] for prev, r in zip(steps, steps[1:])
                if r["block"] == prev["block"]]
    return statistics.median(net)


def summary(res: dict) -> dict:
    """Medians over the runs of each mode, the step time at equal compute, and the kernel / emulated ratios.

    A step is compute + what the link adds. The two modes' compute differs only by what else the machine runs
    meanwhile (the same code, the same data), so the step times are also compared at one compute, the median
    over all runs: ``step_eq`` = that + the mode's median ``net`` (``network_share``)."""
    med = {m: {k: statistics.median(r[k] for r in res[m]) for k in ("step_wall", "goodput", "compute", "S", "net")}
           for m in ("kernel", "emulated")}
    compute = statistics.median(r["compute"] for m in ("kernel", "emulated") for r in res[m])
    for m in med:
        med[m]["step_eq"] = compute + med[m]["net"]
    return {**med, "compute": compute, "step_ratio": med["kernel"]["step_eq"] / med["emulated"]["step_eq"],
            "raw_step_ratio": med["kernel"]["step_wall"] / med["emulated"]["step_wall"],
            "goodput_ratio": med["kernel"]["goodput"] / med["emulated"]["goodput"]}


def report(res: dict, inner_steps: int, command: str) -> str:
    s = summary(res)
    rate = res.get("rate_mbit", RATE_MBIT)
    payload_max = rate * 1448 / (1448 + 66)  # TCP payload per Ethernet frame on the wire (MTU 1500)
    lines = ["# Kernel-shaped link (tc tbf) vs the in-process link emulator, real peers in network namespaces", "",
             f"Command: `{command}` (2 real `deca-peer start` processes, each in its own network namespace with its "
             f"own address, on a bridge; embedded model, layer blocks only, so one message = S bytes = one decoder "
             f"layer in float32; 1 round x 4 blocks x {inner_steps} inner steps per run; `--threads 1`; "
             f"{len(res['kernel'])} run(s) of each, alternately).", "",
             f"* **kernel**: no emulation in the peers; both hosts' eth0 shaped with `tc qdisc add dev eth0 root "
             f"{' '.join(tbf(rate))}`;",
             f"* **emulated**: no qdisc; the topology link `bandwidth_mbps: {rate:g}` (the peers' sender threads).",
             "", "| run | step wall s | compute s | link share s (wall − compute) | goodput Mbit/s | messages | "
             "S (MB) |", "|---|---|---|---|---|---|---|"]
    for m in ("kernel", "emulated"):
        for k, r in enumerate(res[m]):
            lines.append(f"| {m} {k} | {r['step_wall']:.4f} | {r['compute']:.4f} | {r['net']:.4f} | "
                         f"{r['goodput']:.1f} | {r['n_goodput']} | {r['S'] / 1e6:.3f} |")
    lines += ["", "Medians over the runs:", "", "| | kernel (tbf) | emulated | kernel / emulated |", "|---|---|---|---|",
              f"| step wall s, at equal compute ({s['compute']:.4f} s) | {s['kernel']['step_eq']:.4f} | "
              f"{s['emulated']['step_eq']:.4f} | {s['step_ratio']:.3f} |",
              f"| goodput Mbit/s | {s['kernel']['goodput']:.1f} | {s['emulated']['goodput']:.1f} | "
              f"{s['goodput_ratio']:.3f} |",
              f"| step wall s, as measured | {s['kernel']['step_wall']:.4f} | {s['emulated']['step_wall']:.4f} | "
              f"{s['raw_step_ratio']:.3f} |", "",
              "All values are medians over inner steps (over messages for goodput). A step is its compute plus what "
              "the link adds to it (waiting for the neighbour's block, encoding, mixing: *link share*); the two "
              "modes run the same code on the same data, so their compute differs only by what else this machine "
              "runs meanwhile (on a loaded machine, by tens of percent from run to run), and the step times are "
              "compared at one compute, the median over all runs (the as-measured row shows the raw medians).", "",
              "Goodput = S / (one-way delay − encode time) over the block messages sent after their receiver had "
              f"begun its exchange (`bandwidth_latency.measure`). The kernel's {rate:g} Mbit/s counts Ethernet, "
              f"IP and TCP headers (66 bytes per 1448-byte segment: ~{payload_max:.1f} Mbit/s of payload, beyond the "
              "bucket's burst, which an idle link sends at once); "
              "the emulator's "
              "counts the message's bytes only.", "",
              f"Control, measured right after the runs: plain TCP (Python sockets, no ZeroMQ, no peer) moving S-byte "
              "messages through the same tbf link (each timed from its send to its last byte read, one every "
              f"60 ms + 1.5 S/R), gets **{res['raw_tcp']['one']:.1f} Mbit/s** one way and "
              f"**{res['raw_tcp']['both']:.1f} Mbit/s** both ways at the same moments (as the two peers send their "
              "blocks to each other; each host's FIFO queue then holds its own data and the ACKs of the other direction). "
              f"Its gap to {rate:g} is the link itself: the headers (~{payload_max:.1f} Mbit/s of payload) and, "
              "on a loaded "
              "machine, the wake-ups every transfer needs while the message trickles through for S/R. The emulator "
              "models neither: it is a pipe of R bytes/s of message per direction, whose receiver takes the "
              "message whole at its due time, the hosts' own copying overlapped with its transmission "
              "(PROTOCOL.md §4.5).", "",
              "tc statistics after the last kernel run (host 0; host 1): "
              + "; ".join(f"`{q}`" for q in res["qdisc"]), "",
              f"Target: both within 10%. Step time (at equal compute) {abs(s['step_ratio'] - 1) * 100:.1f}% apart, goodput "
              f"{abs(s['goodput_ratio'] - 1) * 100:.1f}% apart.", "",
              f"1-min load average: {res['load'][0]:.1f} before the runs, {os.getloadavg()[0]:.1f} at the end "
              "(2 of it is the two peers themselves)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one run of each, 8 inner steps")
    ap.add_argument("--rate", type=float, default=RATE_MBIT,
                    help=f"Mbit/s of both the tbf link and the emulated one (default {RATE_MBIT}; another rate "
                         "writes netns_tbf_<rate>mbit.md)")
    args = ap.parse_args()
    if not args.rate > 0:
        raise SystemExit("--rate must be > 0")
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    from deca_p2p.models import ensure_default_model

    ensure_default_model()
    inner, repeats = (8, 1) if args.quick else (16, 3)
    tmp = Path(tempfile.mkdtemp(prefix="netns-tbf-"))
    try:
        with NetnsLab(2) as lab:
            res = shaped_vs_emulated(lab, tmp, inner, repeats, log=lambda s: print(s, flush=True),
                                     rate_mbit=args.rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    default = args.rate == RATE_MBIT
    cmd = (".venv/bin/python benchmarks/netns_tbf.py" + (" --quick" if args.quick else "")
           + ("" if default else f" --rate {args.rate:g}"))
    text = report(res, inner, cmd)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("netns_tbf.md" if default else f"netns_tbf_{args.rate:g}mbit.md")).write_text(text)
    print(text)
    s = summary(res)
    print(f"kernel tbf vs emulator at {args.rate:g} Mbit/s: step time x{s['step_ratio']:.3f} at equal compute "
          f"(x{s['raw_step_ratio']:.3f} as measured), goodput x{s['goodput_ratio']:.3f}")


if __name__ == "__main__":
    main()
