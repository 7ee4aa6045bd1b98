"""The fine-tuning benchmark: DECA's readings against the baselines, fine-tuning the pretrained embedded base.

Every run is the in-process reference network (deca_p2p.simulate: the same maths as real peers) fine-tuning the
shipped base (deca_p2p/base_model) on the embedded fine-tuning tasks, split over the peers with Dirichlet(alpha).
Equal inner-step budgets: every method makes T x (blocks) x R local steps per peer... except that a method with a
single block (dadam, dsgd, declora) makes the same number of local steps on its one block. Runs are paired by seed
(the same split, batches and initial model for every method of a seed).

* methods: DECA with h readings `paper`, `qg`, `consensus` and `none` (no BMA), decentralized Adam (dadam), DSGD,
  decentralized LoRA (declora), local-only (DECA without communication) and centralized BAdam (one peer holding
  the pooled data: the upper reference);
* a learning-rate sweep per method on ring8, alpha 0.1, seed 0; every other run uses each method's best rate;
* settings: ring8 and exp16, alpha 0.1 and 1.0, seeds 0..S-1;
* measures: mean-peer and averaged-model eval loss, exact match (mean and per task), `unseen` exact match (tasks
  under 5% of a peer's own shard), consensus distance (mean relative distance of a peer's weights to the network
  average), MB sent per peer (raw fp32 blocks to every neighbour at every exchange, counted from the block
  sizes), peak RSS of one peer (a separate one-peer process per method, a few steps: what a peer holds);
* ablations (DECA's best reading, ring8, alpha 0.1): blocks of 1 vs 2 decoder layers; R = 4 / 8 / 16 at the
  same number of local steps (T adjusted), and R = 32 / 64 at T = 1 (2x and 4x the steps: one round of them is
  already over the budget).

Each finished run is appended to benchmarks/results/finetune_runs.jsonl and reused by a later invocation with
the same settings (delete the file to start over), so the hour-long run can be resumed.

    .venv/bin/python benchmarks/finetune.py [--quick] [--seeds 3]

Writes benchmarks/results/finetune.md and finetune.png; prints the headline last.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, machine_facts, spawn

sys.path.insert(0, str(ROOT))

METHODS = {
    "deca-paper": dict(algo="deca", discrepancy="paper"),
    "deca-qg": dict(algo="deca", discrepancy="qg"),
    "deca-consensus": dict(algo="deca", discrepancy="consensus"),
    "deca-none": dict(algo="deca", discrepancy="none"),
    "dadam": dict(algo="dadam"),
    "dsgd": dict(algo="dsgd"),
    "declora": dict(algo="declora"),
    "local": dict(algo="deca", discrepancy="none", comm="none"),
    "central": dict(algo="deca", discrepancy="none"),  # on complete1: one peer, pooled data
}
DECA_READINGS = ("deca-paper", "deca-qg", "deca-consensus", "deca-none")
ADAM_LRS = (3e-4, 1e-3, 3e-3)
LR_GRID = {m: ADAM_LRS for m in METHODS}
LR_GRID["dsgd"] = (3e-2, 1e-1, 3e-1)
LR_GRID["declora"] = (1e-3, 3e-3, 1e-2)

# The fine-tuning regime: embeddings and head frozen (as BAdam does), constant rate, raw codec.
# Sized to the hour on 2 cores: one torch thread per run (two threads on a shared core spin-wait: measured 27x
# slower), one round of R = 16 steps per block (64 local steps per peer on the 4-layer base).
FULL = dict(rounds=1, inner_steps=16, batch_size=16, train_per_task=300, eval_per_task=16, seeds=3)
QUICK = dict(rounds=1, inner_steps=4, batch_size=8, train_per_task=60, eval_per_task=4, seeds=2)
ABLATION_STEPS = 16  # local steps per block in the R ablation: (R, T) = (4, 4), (8, 2), (16, 1) (the main grid's)
TOPOS = ("ring8", "exp16")
ALPHAS = (0.1, 1.0)
SWEEP = ("ring8", 0.1, 0)

RUNS_FILE = RESULTS / "finetune_runs.jsonl"


def topo_path(name: str) -> Path:
    if name == "complete1":
        p = ROOT / ".deca-cache" / "complete1.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"name": "complete1", "nodes": [0], "edges": [], "weights": "metropolis"}))
        return p
    return ROOT / "topologies" / f"{name}.json"


def base_config(p: dict, **over) -> dict:
    cfg = dict(rounds=p["rounds"], inner_steps=p["inner_steps"], batch_size=p["batch_size"],
               train_per_task=p["train_per_task"], eval_per_task=p["eval_per_task"], embeddings_block=False,
               head_block=False, threads=1, codec="raw", eval_max_new_tokens=16,
               robust="none")  # the plain mix: this compares optimizers (and its first runs predate robust mixing)
    cfg.update(over)
    return cfg


def consensus_distance(models) -> float:
    """Mean over peers of ||θ_i − θ̄|| / ||θ̄|| over the trainable (non-frozen) parameters that differ."""
    import torch

    ms = list(models.values())
    if len(ms) < 2:
        return 0.0
    names = [n for n, _ in ms[0].named_parameters()]
    named = [dict(m.named_parameters()) for m in ms]
    num = [0.0] * len(ms)
    den = 0.0
    for n in names:
        stack = torch.stack([d[n].detach().double() for d in named])
        mean = stack.mean(0)
        den += float(mean.pow(2).sum())
        for i in range(len(ms)):
            num[i] += float((stack[i] - mean).pow(2).sum())
    return statistics.mean(math.sqrt(x / den) for x in num)


def mb_sent_per_peer(model, cfg, topo) -> float:
    """Raw fp32 bytes of every exchanged block to every neighbour, per peer (headers are negligible)."""
    from deca_p2p.trainer import make_blocks, make_schedule

    if cfg.comm == "none" or len(topo.nodes) == 1:
        return 0.0
    blocks = make_blocks(model, cfg)
    named = dict(model.named_parameters())
    sched = make_schedule(len(blocks), cfg)
    per_round = sum(4 * sum(named[n].numel() for n in b.param_names) for b in blocks)
    total = cfg.rounds * per_round * sched.exchanges_per_activation  # every block activated once per round
    deg = statistics.mean(len(topo.neighbors(i)) for i in topo.nodes)
    return total * deg / 1e6


def steps_for(method: str, cfg: dict, n_layers: int) -> dict:
    """Equal local-step budgets: a one-block method gets R x (number of DECA blocks) steps per round."""
    if METHODS[method]["algo"] in ("dadam", "dsgd", "declora"):
        return dict(cfg, inner_steps=cfg["inner_steps"] * math.ceil(n_layers / cfg.get("layers_per_block", 1)))
    return cfg


def run_one(method: str, topo_name: str, alpha: float, seed: int, lr: float, p: dict, extra: dict | None = None) -> dict:
    from deca_p2p.config import make_config
    from deca_p2p.models import default_model_path, load_model
    from deca_p2p.report import unseen_accuracy
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load

    name = "complete1" if method == "central" else topo_name
    topo = load(topo_path(name))
    n_layers = load_model(default_model_path())[0].config.num_hidden_layers
    over = dict(METHODS[method], seed=seed, alpha=alpha, lr=lr, **(extra or {}))
    cfg = make_config(None, steps_for(method, base_config(p, **over), n_layers))
    t0 = time.perf_counter()
    res = simulate(topo, cfg)
    wall = time.perf_counter() - t0
    per = res.per_peer
    tasks = sorted(k for k in next(iter(per.values())) if k.startswith("acc/"))
    unseen = [u for u in (unseen_accuracy(res.labels.get(i), per[i]) for i in per) if u is not None]
    return {
        "eval_loss": statistics.mean(r["eval_loss"] for r in per.values()),
        "avg_eval_loss": res.average_model["eval_loss"],
        "acc": statistics.mean(r["acc"] for r in per.values()),
        "avg_acc": res.average_model["acc"],
        "per_task": {t[4:]: statistics.mean(r[t] for r in per.values()) for t in tasks},
        "unseen": statistics.mean(unseen) if unseen else None,
        "consensus": consensus_distance(res.models),
        "mb_sent": mb_sent_per_peer(next(iter(res.models.values())), cfg, topo),
        "wall_s": wall,
    }


class Runs:
    """Finished runs on disk, keyed by everything that defines them."""

    def __init__(self, path: Path, quick: bool, cached_only: bool = False):
        self.path, self.quick, self.done, self.cached_only, self.missing = path, quick, {}, cached_only, 0
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[r["key"]] = r["result"]

    def get(self, method, topo, alpha, seed, lr, p, extra=None):
        key = json.dumps([method, topo, alpha, seed, lr, extra or {}, {k: p[k] for k in sorted(p) if k != "seeds"}])
        if key not in self.done and self.cached_only:
            self.missing += 1
            return None
        if key not in self.done:
            t0 = time.perf_counter()
            res = run_one(method, topo, alpha, seed, lr, p, extra)
            self.done[key] = res
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "result": res}) + "\n")
            print(f"  {method:15s} {topo} a={alpha} s={seed} lr={lr:g} {extra or ''}: eval {res['eval_loss']:.4f} "
                  f"acc {res['acc']:.3f} unseen {res['unseen'] if res['unseen'] is None else round(res['unseen'], 3)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return self.done[key]


def peak_rss_child(method: str, p: dict) -> None:
    """One peer alone (complete1), a few steps: the kernel's high-water mark of what a peer holds."""
    from deca_p2p.config import make_config
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load

    cfg = make_config(None, base_config(p, **{k: v for k, v in METHODS[method].items() if k != "comm"},
                                        rounds=1, inner_steps=2, lr=1e-4, train_per_task=40, eval_per_task=2))
    simulate(load(topo_path("complete1")), cfg)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(method: str, p: dict, quick: bool) -> float:
    proc = spawn(__file__, ["--child-rss", method] + (["--quick"] if quick else []))
    out, _ = proc.communicate(timeout=600)
    return json.loads(out.strip().splitlines()[-1])["peak_mb"] if proc.returncode == 0 else float("nan")


def ms(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of a few minutes")
    ap.add_argument("--seeds", type=int, help="seeds per setting (default 3; quick 2)")
    ap.add_argument("--methods", help="comma-separated subset of methods")
    ap.add_argument("--runs-only", action="store_true",
                    help="only compute the runs (e.g. one share of the methods per core); a later plain invocation "
                         "reuses them and writes the report")
    ap.add_argument("--cached-only", action="store_true",
                    help="write the report from the finished runs only; runs not done are reported as missing")
    ap.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.seeds:
        p["seeds"] = args.seeds
    if args.child_rss:
        peak_rss_child(args.child_rss, p)
        return
    methods = [m for m in METHODS if not args.methods or m in args.methods.split(",")]
    try:
        import peft  # noqa: F401
        from deca_p2p.config import make_config
        make_config(None, {"algo": "declora"})
    except Exception:  # noqa: BLE001 - declora not available in this checkout
        methods = [m for m in methods if m != "declora"]
    t_start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = Runs(RESULTS / ("finetune_runs_quick.jsonl" if args.quick else "finetune_runs.jsonl"), args.quick,
                args.cached_only)

    print("== learning-rate sweep (ring8, alpha 0.1, seed 0)", flush=True)
    best_lr, sweep = {}, {}
    for m in methods:
        for lr in LR_GRID[m]:
            sweep[(m, lr)] = runs.get(m, *SWEEP, lr, p)
        best_lr[m] = min((lr for lr in LR_GRID[m] if sweep[(m, lr)]), key=lambda lr: sweep[(m, lr)]["eval_loss"],
                         default=LR_GRID[m][1])

    # ablations first (DECA's best reading in the sweep, ring8, alpha 0.1): they share the grid's first cell
    readings = [m for m in DECA_READINGS if m in methods]
    abl = {}
    best_reading = min(readings, key=lambda m: sweep[(m, best_lr[m])]["eval_loss"] if sweep[(m, best_lr[m])]
                       else math.inf) if readings else None
    if best_reading:
        print(f"== ablations ({best_reading})", flush=True)
        total_steps = 8 if args.quick else ABLATION_STEPS
        for lpb in (1, 2):
            abl[("lpb", lpb)] = [runs.get(best_reading, *SWEEP[:2], s, best_lr[best_reading], p,
                                          {} if lpb == 1 else {"layers_per_block": lpb}) for s in range(p["seeds"])]
        # R = 4, 8, 16 at the same number of local steps; R = 32 and 64 (the issue's) cannot be: one round of them
        # is already 2x and 4x the budget, so they run T = 1 with those extra steps (said in their label)
        for r in ((2, 4, 8) if args.quick else (4, 8, 16, 32, 64)):
            rounds = max(1, total_steps // r)
            extra = {} if (r, rounds) == (p["inner_steps"], p["rounds"]) else {"inner_steps": r, "rounds": rounds}
            abl[("R", r)] = [runs.get(best_reading, *SWEEP[:2], s, best_lr[best_reading], p, extra)
                             for s in range(p["seeds"])]

    print("== main grid", flush=True)
    grid = {}
    for topo in TOPOS:
        for alpha in ALPHAS:
            for m in methods:
                if m == "central" and topo != TOPOS[0]:
                    continue  # one peer: the topology does not matter
                for s in range(p["seeds"]):
                    r = runs.get(m, topo, alpha, s, best_lr[m], p)
                    if r is not None:
                        grid[(m, topo, alpha, s)] = r

    def g(m, topo, alpha):
        topo = TOPOS[0] if m == "central" else topo
        return [grid[(m, topo, alpha, s)] for s in range(p["seeds"]) if (m, topo, alpha, s) in grid]

    if readings:
        best_reading = min(readings, key=lambda m: statistics.mean(
            [r["eval_loss"] for t in TOPOS for a in ALPHAS for r in g(m, t, a)] or [math.inf]))

    if args.runs_only:
        return
    print("== peak RSS of one peer", flush=True)
    rss = {m: peak_rss(m, p, args.quick) for m in methods if m not in ("local", "central")}

    # ------------------------------------------------------------------ report
    lines = ["# Fine-tuning benchmark: DECA readings vs baselines on the pretrained base", "",
             f"`.venv/bin/python benchmarks/finetune.py{' --quick' if args.quick else ''}"
             f"{f' --seeds {args.seeds}' if args.seeds else ''}` "
             f"({(time.perf_counter() - t_start) / 60:.0f} min this invocation; finished runs are reused from "
             f"`{runs.path.name}`). In-process reference network (`simulate`), the shipped base "
             f"(`deca_p2p/base_model`) fine-tuned on the embedded fine-tuning tasks, embeddings and head frozen, raw "
             f"codec, constant learning rate, batch {p['batch_size']}, T = {p['rounds']} rounds x R = "
             f"{p['inner_steps']} inner steps per block (one-block methods: the same number of local steps), "
             f"{p['train_per_task']} training records per task before the split, {p['eval_per_task']} eval records "
             f"per task; {p['seeds']} seeds paired (same split, batches and start for every method)."
             + (f" **{runs.missing} planned runs were not done** (the session ran out of time; `--cached-only` "
                "report): the `seeds` column says how many each cell has." if runs.missing else ""), "",
             f"Machine: {machine_facts()}", "",
             "## Learning-rate sweep (ring8, α = 0.1, seed 0): mean-peer eval loss", "",
             "| method | " + " | ".join(f"lr {i + 1}" for i in range(3)) + " | best |", "|---|---|---|---|---|"]
    for m in methods:
        cells = [f"{lr:g}: {sweep[(m, lr)]['eval_loss']:.4f}" if sweep[(m, lr)] else f"{lr:g}: not run"
                 for lr in LR_GRID[m]]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | **{best_lr[m]:g}** |")
    lines += ["", "## Headline: method x α x topology (mean ± std over seeds)", "",
              "| method | topology | α | seeds | eval loss (mean peer) | eval loss (avg model) | exact match | unseen | "
              "consensus dist. | MB sent / peer | peak RSS / peer (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for topo in TOPOS:
        for alpha in ALPHAS:
            for m in methods:
                rs = g(m, topo, alpha)
                if not rs:
                    continue
                lines.append(f"| {m} | {'pooled' if m == 'central' else topo} | {alpha:g} | {len(rs)} | "
                             f"{ms([r['eval_loss'] for r in rs])} | {ms([r['avg_eval_loss'] for r in rs])} | "
                             f"{ms([r['acc'] for r in rs])} | {ms([r['unseen'] for r in rs])} | "
                             f"{ms([r['consensus'] for r in rs])} | {rs[0]['mb_sent']:.0f} | "
                             f"{rss.get(m, float('nan')):.0f} |")
    tasks = sorted(grid[(methods[0], TOPOS[0], ALPHAS[0], 0)]["per_task"])
    lines += ["", "## Exact match per task (ring8, α = 0.1, mean over seeds)", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        rs = g(m, TOPOS[0], ALPHAS[0])
        if not rs:
            continue
        lines.append(f"| {m} | " + " | ".join(f"{statistics.mean(r['per_task'][t] for r in rs):.2f}" for t in tasks) + " |")
    lines += ["", "## Does BMA help? Paired difference in mean-peer eval loss vs `deca-none` (negative: better)", "",
              "| reading | " + " | ".join(f"{t} α={a:g}" for t in TOPOS for a in ALPHAS) + " | all |",
              "|---|" + "---|" * (len(TOPOS) * len(ALPHAS) + 1)]
    verdict = {}
    for m in readings:
        if m == "deca-none":
            continue
        cells, every = [], []
        for t in TOPOS:
            for a in ALPHAS:
                d = [grid[(m, t, a, s)]["eval_loss"] - grid[("deca-none", t, a, s)]["eval_loss"]
                     for s in range(p["seeds"]) if (m, t, a, s) in grid and ("deca-none", t, a, s) in grid]
                every += d
                cells.append(ms(d))
        if not every:
            continue
        verdict[m] = statistics.mean(every)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {ms(every)} |")
    lines += ["", f"## Ablations ({best_reading}, ring8, α = 0.1)", "",
              "| variant | eval loss | exact match | unseen |", "|---|---|---|---|"]
    for (kind, v), rs in abl.items():
        rs = [r for r in rs if r is not None]
        if not rs:
            continue
        label = f"{v} decoder layer{'s' if v > 1 else ''} per block" if kind == "lpb" else \
            f"R = {v}, T = {max(1, total_steps // v)}" + (f" ({v // total_steps}x the steps)" if v > total_steps else "")
        lines.append(f"| {label} | {ms([r['eval_loss'] for r in rs])} | {ms([r['acc'] for r in rs])} | "
                     f"{ms([r['unseen'] for r in rs])} |")
    winner = min(methods, key=lambda m: statistics.mean([r["eval_loss"] for t in TOPOS for a in ALPHAS
                                                         for r in g(m, t, a)] or [math.inf]) if m != "central" else math.inf)
    bma_wins = [m for m, d in verdict.items() if d < 0]
    headline = (f"best decentralized method by mean-peer eval loss: {winner} (lr {best_lr[winner]:g}); best DECA "
                f"reading: {best_reading}; BMA beats none in "
                f"{', '.join(bma_wins) if bma_wins else 'no reading'} (paired mean Δ: "
                + ", ".join(f"{m.split('-')[1]} {d:+.4f}" for m, d in verdict.items()) + ")")
    lines += ["", "**" + headline + "**", ""]
    name = "finetune_quick" if args.quick else "finetune"
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    (RESULTS / f"{name}.json").write_text(json.dumps({"best_lr": best_lr, "best_reading": best_reading,
                                                      "winner": winner, "bma_delta": verdict}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TOPOS) * len(ALPHAS), figsize=(4 * len(TOPOS) * len(ALPHAS), 4), sharey=True)
    for ax, (t, a) in zip(axes, [(t, a) for t in TOPOS for a in ALPHAS]):
        vals = [statistics.mean([r["eval_loss"] for r in g(m, t, a)] or [0.0]) for m in methods]
        errs = [statistics.stdev([r["eval_loss"] for r in g(m, t, a)]) if len(g(m, t, a)) > 1 else 0 for m in methods]
        ax.bar(range(len(methods)), vals, yerr=errs, color=["#2a7" if m.startswith("deca") else "#888" for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{t}, α = {a:g}")
    axes[0].set_ylabel("mean-peer eval loss")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(headline)


if __name__ == "__main__":
    main()
