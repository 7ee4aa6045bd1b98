"""Convergence of DECA's discrepancy readings against the baselines, on the embedded non-IID task set.

Eight peers on a ring (topologies/ring8.json), Dirichlet(0.25) split of the six generated tasks, the same seeds
(0, 1, 2) and the same number of inner steps for every method, all in the in-process reference network
(`deca_p2p.simulate`, bit-identical to real peers with the raw codec):

    DECA paper   h_r = θ_{r+1} − θ_r                      (DESIGN §2, "paper")
    DECA qg      h_r = (θ_r − θ_{r+1}) / γ                (gradient scale, quasi-global momentum)
    no BMA       discrepancy=none (β1 = β2 = 1: decentralized block-wise Adam)
    DSGD         algo=dsgd, whole model, gossip after every SGD step (lr: see DSGD_LR)
    local only   comm=none (each peer BAdam on its own shard, no BMA: there is no consensus to fold in)
    centralized  BAdam (discrepancy=none) on the pooled data: one node, batch 8 x the per-peer batch

Per run it records, from the per-peer JSONL, the mean-peer global eval loss / accuracy (eval records), the
mean train loss per inner step, the bytes each peer sent (analytic: raw codec = 4 bytes x numel(active block)
x degree per exchange; message headers, ~200 bytes, left out), and the true consensus distance
mean_i ||θ_i − θ̄|| after every exchange, measured on the peers' models in memory (a hook around
`PeerTrainer.apply_mix` in this script; the library is unchanged and the maths untouched).

    .venv/bin/python benchmarks/convergence.py [--quick] [--rounds 2] [--inner-steps 5] [--seeds 0,1,2]
    .venv/bin/python benchmarks/convergence.py --sweep-dsgd      # the short DSGD learning-rate sweep

Writes benchmarks/results/convergence.md and .png; prints "default discrepancy: X" last.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
N_PEERS = 8
BASE_BATCH = 16  # TrainConfig's default per-peer batch
# SGD on this randomly initialised model needs a far larger step than Adam's 1e-3; 0.1 won the sweep
# (`--sweep-dsgd`, results in convergence_dsgd_lr.md): lowest final eval loss of {0.03, 0.1, 0.3, 1.0}
DSGD_LR = 0.1
DSGD_SWEEP = (0.03, 0.1, 0.3, 1.0)

METHODS = {  # key -> (label, config overrides)
    "paper": ("DECA paper", {"algo": "deca", "discrepancy": "paper"}),
    "qg": ("DECA qg", {"algo": "deca", "discrepancy": "qg"}),
    "none": ("no BMA (none)", {"algo": "deca", "discrepancy": "none"}),
    "dsgd": ("DSGD", {"algo": "dsgd"}),
    "local": ("local only", {"algo": "deca", "discrepancy": "none", "comm": "none"}),
    "central": ("centralized BAdam", {"algo": "deca", "discrepancy": "none", "batch_size": N_PEERS * BASE_BATCH}),
}
COLORS = {"paper": "C0", "qg": "C1", "none": "C2", "dsgd": "C3", "local": "C7", "central": "k"}
DISCREPANCIES = ("paper", "qg", "none")
WHY = ("**Why** (a diagnostic outside this script: `simulate` on ring8, 1 round x 5 inner steps, seed 0, the moments "
       "of decoder block 2 from the step records): with `qg`, h = (θ_r − θ_{r+1})/γ is dominated by the gossip "
       "correction divided by γ = 1e-3 (‖h‖ ≈ 260–330 against ‖g‖ ≈ 1.2–1.8), so m and v fill with it (v_mean "
       "2e-3 against 6e-8 without BMA) and the Adam step stops following the gradient; with `paper`, h is at "
       "parameter scale, so each BMA update mostly shrinks m by β1 (‖m‖ 0.26 against 0.30 without BMA): smaller "
       "steps, which keep the peers closer (the lowest consensus distance of the three) but learn more slowly. On "
       "this non-IID task set from random initialisation, plain decentralized block-wise Adam (`none`) makes the "
       "most progress per inner step at lr 1e-3.")


# --------------------------------------------------------------------------- one run (in a worker process)

class ConsensusTracker:
    """Consensus distance after every exchange, from the models themselves.

    Wraps PeerTrainer.apply_mix: after all n peers have applied their mix for an inner step, it stacks the
    active block across peers and records mean_i ||θ_i − θ̄|| of that block, and of the whole model
    (inactive blocks are frozen, so the whole-model distance is the root of the per-block squared distances
    last recorded for each block; all peers start from the same weights, so unseen blocks contribute 0).
    """

    def __init__(self, n: int):
        self.n = n
        self.pending: list = []
        self.block_sq: list[dict] = [dict() for _ in range(n)]
        self.active: list[float] = []
        self.whole: list[float] = []

    def record(self, names, mixed) -> None:
        import torch
        self.pending.append(list(mixed))  # fresh tensors from the mixer (or clones): never mutated afterwards
        if len(self.pending) < self.n:
            return
        sq = torch.zeros(self.n, dtype=torch.float64)
        for k in range(len(self.pending[0])):
            x = torch.stack([p[k].detach() for p in self.pending]).flatten(1)
            sq += (x - x.mean(0, keepdim=True)).pow(2).sum(1, dtype=torch.float64)
        self.pending = []
        d = sq.sqrt()
        key = tuple(names)
        for i in range(self.n):
            self.block_sq[i][key] = float(sq[i])
        self.active.append(float(d.mean()))
        self.whole.append(sum(math.sqrt(sum(b.values())) for b in self.block_sq) / self.n)


def run_one(job: dict) -> dict:
    """Runs one (method, seed) simulation; returns everything the report needs (plain Python data)."""
    import torch

    from deca_p2p.config import make_config
    from deca_p2p.metrics import read_metrics
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load, ring
    from deca_p2p.trainer import PeerTrainer, make_blocks

    torch.set_num_threads(1)
    method, seed = job["method"], job["seed"]
    overrides = dict(METHODS[method][1])
    overrides.update(seed=seed, threads=1, rounds=job["rounds"], inner_steps=job["inner_steps"],
                     train_per_task=job["train_per_task"], eval_per_task=job["eval_per_task"])
    if method == "dsgd":
        # One whole-model block: match DECA's total inner steps and its eval points (every eval_every activations)
        overrides.update(lr=job.get("lr", DSGD_LR), rounds=job["rounds"] * job["n_blocks"] // job["eval_every"],
                         inner_steps=job["inner_steps"] * job["eval_every"])
    else:
        overrides["eval_every"] = job["eval_every"]
    cfg = make_config(None, overrides)
    topo = ring(1) if method == "central" else load(ROOT / "topologies" / "ring8.json")
    tracker = ConsensusTracker(len(topo.nodes))
    orig = PeerTrainer.apply_mix

    def apply_mix(self, mixed):
        out = orig(self, mixed)
        tracker.record(self.active.block.param_names, mixed)
        return out

    PeerTrainer.apply_mix = apply_mix
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="deca-conv-") as run_dir:
        try:
            res = simulate(topo, cfg, run_dir=run_dir)
        finally:
            PeerTrainer.apply_mix = orig
        recs = read_metrics(run_dir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # block sizes (numel), for the analytic byte counts
    any_model = next(iter(res.models.values()))
    named = dict(any_model.named_parameters())
    numel = [sum(named[n].numel() for n in b.param_names) for b in make_blocks(any_model, cfg)]
    n = len(topo.nodes)
    steps = max(r["istep"] for r in recs[topo.nodes[0]] if r["event"] == "step") + 1
    train_loss = [0.0] * steps
    bytes_cum = [0.0] * steps
    for pid, rs in recs.items():
        deg = len(topo.neighbors(pid))
        per_step = [0.0] * steps
        for r in rs:
            if r["event"] != "step":
                continue
            train_loss[r["istep"]] += r["loss"] / n
            if cfg.comm != "none" and r.get("seq") is not None:
                per_step[r["istep"]] += 4 * numel[r["block"]] * deg
        acc = 0.0
        for k in range(steps):
            acc += per_step[k]
            bytes_cum[k] += acc / n
    evals: dict[int, list[dict]] = {}
    for pid, rs in recs.items():
        for r in rs:
            if r["event"] == "eval":
                x = (r["activation"] + 1) * cfg.inner_steps
                evals.setdefault(x, []).append(r)
    eval_x = [0] + sorted(evals)
    eval_loss = [res.initial["eval_loss"]] + [statistics.fmean(r["eval_loss"] for r in evals[x]) for x in eval_x[1:]]
    eval_acc = [res.initial["acc"]] + [statistics.fmean(r["acc"] for r in evals[x]) for x in eval_x[1:]]
    peers = list(res.per_peer.values())
    return {
        "method": method, "seed": seed, "lr": cfg.lr, "wall_s": wall, "cpu_s": cpu, "steps": steps,
        "train_loss": train_loss, "bytes_cum": bytes_cum,
        "eval_x": eval_x, "eval_loss": eval_loss, "eval_acc": eval_acc,
        "cons_active": tracker.active if n > 1 else [0.0] * steps,
        "cons_whole": tracker.whole if n > 1 else [0.0] * steps,
        "final_loss": statistics.fmean(p["eval_loss"] for p in peers),
        "final_acc": statistics.fmean(p["acc"] for p in peers),
        "avg_loss": res.average_model["eval_loss"], "avg_acc": res.average_model["acc"],
        "task_acc": {k[4:]: statistics.fmean(p[k] for p in peers) for k in sorted(peers[0]) if k.startswith("acc/")},
        "initial_loss": res.initial["eval_loss"],
        "bytes_total": bytes_cum[-1], "numel": numel,
    }


def run_all(jobs: list[dict], workers: int, log) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = []
    with ctx.Pool(workers) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            log(f"  {r['method']:>8} seed {r['seed']} lr {r['lr']:g}: final mean-peer eval loss {r['final_loss']:.4f}, "
                f"acc {r['final_acc']:.3f}, avg-model loss {r['avg_loss']:.4f}, {r['wall_s']:.0f} s ({r['cpu_s']:.0f} s CPU)")
            out.append(r)
    return out


# --------------------------------------------------------------------------- report

def ms(vals: list[float], fmt: str = ".3f") -> str:
    if len(vals) < 2:
        return format(vals[0], fmt)
    return f"{statistics.fmean(vals):{fmt}} ± {statistics.stdev(vals):{fmt}}"


def mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    cols = list(zip(*(r[key] for r in runs)))
    mean = [statistics.fmean(c) for c in cols]
    std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
    return mean, std


def plot(by_method: dict[str, list[dict]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (a_loss, a_acc, a_cons), (b_loss, b_acc, a_train) = axes
    for m, runs in by_method.items():
        label, c = METHODS[m][0], COLORS[m]
        x = runs[0]["eval_x"]
        for ax, key in ((a_loss, "eval_loss"), (a_acc, "eval_acc")):
            mean, std = mean_curve(runs, key)
            ax.plot(x, mean, "o-", color=c, label=label, ms=3)
            ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color=c, alpha=0.15)
        steps = list(range(1, runs[0]["steps"] + 1))
        mean, std = mean_curve(runs, "train_loss")
        a_train.plot(steps, mean, color=c, label=label, lw=1)
        if m not in ("central",):
            mean, _ = mean_curve(runs, "cons_whole")
            a_cons.plot(steps, mean, color=c, label=f"{label} (whole model)", lw=1.2)
            if m not in ("dsgd",):
                mean, _ = mean_curve(runs, "cons_active")
                a_cons.plot(steps, mean, color=c, ls=":", lw=1, label=f"{label} (active block)")
        # against bytes: the value at each eval point vs the bytes sent by then
        mb = [0.0] + [statistics.fmean(r["bytes_cum"][xx - 1] for r in runs) / 1e6 for xx in x[1:]]
        for ax, key in ((b_loss, "eval_loss"), (b_acc, "eval_acc")):
            mean, _ = mean_curve(runs, key)
            if runs[0]["bytes_total"] == 0:
                ax.axhline(mean[-1], color=c, ls="--", lw=1, label=f"{label}: final (0 bytes)")
            else:  # log axis: the start (0 bytes) is the dotted line
                ax.plot(mb[1:], mean[1:], "o-", color=c, label=label, ms=3)
    for ax, key in ((b_loss, "eval_loss"), (b_acc, "eval_acc")):
        start = statistics.fmean(r[key][0] for r in next(iter(by_method.values())))
        ax.axhline(start, color="0.5", ls=":", lw=1, label="start (all methods)")
    a_loss.set(xlabel="inner step", ylabel="mean-peer global eval loss", title="eval loss vs steps")
    a_acc.set(xlabel="inner step", ylabel="mean-peer exact-match accuracy", title="eval accuracy vs steps")
    a_cons.set(xlabel="inner step", ylabel="mean_i ||θ_i − θ̄||", title="consensus distance (after mixing)")
    a_cons.set_yscale("log")
    b_loss.set(xlabel="MB sent per peer (raw codec)", ylabel="mean-peer global eval loss", title="eval loss vs bytes sent")
    b_acc.set(xlabel="MB sent per peer (raw codec)", ylabel="mean-peer exact-match accuracy", title="eval accuracy vs bytes sent")
    a_train.set(xlabel="inner step", ylabel="mean-peer train loss (own minibatch)", title="train loss")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    from matplotlib.ticker import NullFormatter
    for ax in (b_loss, b_acc):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired(by_method, a: str, b: str, key: str = "final_loss") -> tuple[float, float]:
    da = {r["seed"]: r[key] for r in by_method[a]}
    db = {r["seed"]: r[key] for r in by_method[b]}
    diffs = [da[s] - db[s] for s in sorted(da) if s in db]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, a few steps, small data (smoke test, < 60 s)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--inner-steps", type=int)
    ap.add_argument("--seeds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sweep-dsgd", action="store_true", help="only the DSGD learning-rate sweep (seed 0)")
    a = ap.parse_args()
    t_start = time.perf_counter()
    rounds = a.rounds or (1 if a.quick else 2)
    inner = a.inner_steps or (2 if a.quick else 5)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else ([0] if a.quick else [0, 1, 2])
    train_per_task = 100 if a.quick else 2000
    eval_per_task = 2 if a.quick else 20
    n_blocks = 6  # embeddings + 4 decoder layers + head of the embedded model
    eval_every = 3  # evaluate twice per round (after blocks 0-2 and 3-5)
    base = {"rounds": rounds, "inner_steps": inner, "train_per_task": train_per_task, "eval_per_task": eval_per_task,
            "n_blocks": n_blocks, "eval_every": eval_every}
    log = lambda s: print(s, flush=True)  # noqa: E731
    RESULTS.mkdir(parents=True, exist_ok=True)

    if a.sweep_dsgd:
        jobs = [dict(base, method="dsgd", seed=seeds[0], lr=lr) for lr in DSGD_SWEEP]
        log(f"DSGD lr sweep: {len(jobs)} runs, {rounds} rounds x {n_blocks} blocks x {inner} inner steps equivalent")
        runs = sorted(run_all(jobs, a.workers, log), key=lambda r: r["lr"])
        cmd = ".venv/bin/python benchmarks/convergence.py --sweep-dsgd" + (" --quick" if a.quick else "") + \
            f" --rounds {rounds} --inner-steps {inner} --seeds {seeds[0]}"
        lines = ["# DSGD learning-rate sweep (for benchmarks/convergence.py)", "", f"Command: `{cmd}`", "",
                 f"ring8, seed {seeds[0]}, {rounds * n_blocks * inner} SGD steps on the whole model, batch {BASE_BATCH} "
                 f"per peer, {train_per_task} train / {eval_per_task} eval examples per task.", "",
                 "| lr | mean-peer eval loss (start → end) | mean-peer acc | avg-model eval loss | last mean train loss |",
                 "|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['lr']:g} | {r['initial_loss']:.3f} → {r['final_loss']:.3f} | {r['final_acc']:.3f} | "
                         f"{r['avg_loss']:.3f} | {r['train_loss'][-1]:.3f} |")
        finite = [r for r in runs if math.isfinite(r["final_loss"])]
        best = min(finite, key=lambda r: r["final_loss"])
        lines += ["", f"Best: lr {best['lr']:g}; `DSGD_LR` in the script is {DSGD_LR:g}.",
                  f"Wall time {time.perf_counter() - t_start:.0f} s."]
        (RESULTS / "convergence_dsgd_lr.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"best DSGD lr: {best['lr']:g}")
        return

    jobs = []
    for seed in seeds:
        for m in ("central", "dsgd", "paper", "qg", "none", "local"):  # slowest first
            jobs.append(dict(base, method=m, seed=seed))
    log(f"{len(jobs)} runs on {a.workers} worker processes (1 torch thread each): {rounds} rounds x {n_blocks} blocks x "
        f"{inner} inner steps, seeds {seeds}")
    runs = run_all(jobs, a.workers, log)
    by_method = {m: sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"]) for m in METHODS}
    wall = time.perf_counter() - t_start
    cpu = sum(r["cpu_s"] for r in runs)

    cmd = ".venv/bin/python benchmarks/convergence.py" + (" --quick" if a.quick else "")
    if a.rounds or a.inner_steps or a.seeds:
        cmd += f" --rounds {rounds} --inner-steps {inner} --seeds {','.join(map(str, seeds))}"
    total_steps = rounds * n_blocks * inner
    ref = by_method["paper"][0]
    numel = ref["numel"]
    lines = [f"# Convergence: DECA discrepancy readings vs baselines (ring8, non-IID, {len(seeds)} seed(s))", "",
             f"Command: `{cmd}` ({wall:.0f} s wall on {os.cpu_count()} cores, {a.workers} simulations at a time, "
             f"1 torch thread each; the simulations used {cpu:.0f} CPU-seconds in all, i.e. ~{cpu / a.workers:.0f} s "
             "of wall time when the cores are not shared with other work)", "",
             f"Setup: embedded model ({sum(numel) / 1e6:.2f} M parameters; blocks embeddings / 4 decoder layers / head of "
             f"{', '.join(f'{k / 1e3:.1f}k' for k in numel)} parameters), the six generated tasks, "
             f"{train_per_task} train examples per task split over 8 peers with Dirichlet(0.25), global eval set "
             f"{eval_per_task} per task; {rounds} rounds x {n_blocks} blocks x {inner} inner steps = {total_steps} "
             f"inner steps for every method; lr 1e-3 (Adam methods), batch {BASE_BATCH} per peer, seeds {seeds} "
             "(the seed draws the data, the split and the minibatches; the model's initial weights are fixed). "
             "In-process reference network (`deca_p2p.simulate`), raw codec.", "",
             "Methods:", "",
             "- **DECA paper / qg / none**: `--discrepancy paper|qg|none` (DESIGN §2); `none` is the \"without BMA\" "
             "ablation (decentralized block-wise Adam).",
             f"- **DSGD**: `--algo dsgd --lr {DSGD_LR:g}`: SGD on the whole model, gossip after every step; "
             f"{total_steps} steps in {rounds * n_blocks // eval_every} activations of {inner * eval_every} steps so "
             "that it is evaluated at the same inner steps. Plain SGD on this randomly initialised model needs a far "
             "larger step than Adam's 1e-3; the lr was picked by the sweep below (`--sweep-dsgd`).",
             "- **local only**: `--comm none`, block-wise Adam without BMA (with no gossip there is no consensus "
             "discrepancy to fold in; `paper` would fold each peer's own Adam step back into m and v).",
             f"- **centralized BAdam**: one node holding all {6 * train_per_task} training examples, batch "
             f"{N_PEERS} x {BASE_BATCH} = {N_PEERS * BASE_BATCH} (the samples the 8 peers see per step together), "
             "block-wise Adam with moment reset on activation, no BMA: BAdam on pooled data, the upper reference.", "",
             "Bytes: per peer, raw codec: 4 bytes x numel(active block) x degree per exchange (deltas after the "
             "first, full block first: same size), message headers left out; centralized and local only send 0. "
             "Consensus distance: mean_i ||θ_i − θ̄|| measured on the peers' weights after every mix (solid: whole "
             "model; dotted: the active block).", "",
             "## Final results (mean ± std over seeds)", "",
             "| method | mean-peer eval loss | mean-peer acc | averaged-model eval loss | averaged-model acc | "
             "MB sent per peer | final consensus distance (whole model) | CPU s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for m, rs in by_method.items():
        lines.append(f"| {METHODS[m][0]} | {ms([r['final_loss'] for r in rs])} | {ms([r['final_acc'] for r in rs])} | "
                     f"{ms([r['avg_loss'] for r in rs])} | {ms([r['avg_acc'] for r in rs])} | "
                     f"{statistics.fmean(r['bytes_total'] for r in rs) / 1e6:.1f} | "
                     f"{ms([r['cons_whole'][-1] for r in rs], '.4f')} | {statistics.fmean(r['cpu_s'] for r in rs):.0f} |")
    lines += ["", f"Initial eval loss (all methods, mean over seeds): "
              f"{statistics.fmean(r['initial_loss'] for r in by_method['paper']):.3f}.", ""]
    tasks = list(by_method["paper"][0]["task_acc"])
    lines += ["Mean-peer exact-match accuracy per task (mean over seeds). At this budget only `count` is ever answered "
              "right (its answers are a few small numbers), so accuracy is coarse and noisy and equal values across "
              "methods are hits on the same count examples; eval loss is the measure to compare:", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, rs in by_method.items():
        lines.append(f"| {METHODS[m][0]} | " + " | ".join(
            f"{statistics.fmean(r['task_acc'][t] for r in rs):.3f}" for t in tasks) + " |")
    lines.append("")
    # the discrepancy verdict
    means = {d: statistics.fmean(r["final_loss"] for r in by_method[d]) for d in DISCREPANCIES}
    order = sorted(DISCREPANCIES, key=lambda d: means[d])
    win = order[0]
    lines += ["## Which discrepancy reading wins", "",
              "Paired by seed (same data, split and minibatches), difference of final mean-peer eval loss "
              "(negative: the first is better):", ""]
    for x, y in (("paper", "qg"), ("paper", "none"), ("qg", "none")):
        d, s = paired(by_method, x, y)
        da, sa = paired(by_method, x, y, "avg_loss")
        lines.append(f"- {x} − {y}: {d:+.4f} ± {s:.4f} (averaged model: {da:+.4f} ± {sa:.4f})")
    second = order[1]
    d, s = paired(by_method, win, second)
    clear = len(seeds) > 1 and abs(d) > 2 * s / math.sqrt(len(seeds))
    if means[win] == means[second]:
        lines.append("")
        lines.append(f"Tie between {win} and {second} (identical losses: with one inner step per activation the moments "
                     "are reset before BMA can act); the first in the order paper, qg, none is taken.")
    lines += ["", f"Ranking on final mean-peer eval loss: {' < '.join(f'{k} ({means[k]:.4f})' for k in order)}. "
              f"**{win}** wins; its margin over {second} is {abs(d):.4f} "
              f"({'more' if clear else 'less'} than twice the standard error of the paired difference over "
              f"{len(seeds)} seed(s){'' if clear else ': within noise at this budget'})."]
    lines += ["", WHY]
    sweep = RESULTS / "convergence_dsgd_lr.md"
    if sweep.is_file():
        lines += ["", "## DSGD learning rate", "", *sweep.read_text().splitlines()[2:]]
    lines += ["", "![convergence](convergence.png)"]
    (RESULTS / "convergence.md").write_text("\n".join(lines) + "\n")
    plot(by_method, RESULTS / "convergence.png",
         f"ring8, non-IID Dirichlet(0.25), {total_steps} inner steps, mean ± std over seeds {seeds}")
    print("\n".join(lines))
    print(f"wall time {wall:.0f} s ({cpu:.0f} CPU-seconds over {a.workers} workers)")
    print(f"final mean-peer eval loss: paper {means['paper']:.4f}, qg {means['qg']:.4f}, none {means['none']:.4f}")
    print(f"default discrepancy: {win}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
