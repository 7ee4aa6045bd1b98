"""DECA versus local-only training on the embedded non-IID task set, in the in-process reference network.

Do peers learn tasks they never (or barely) saw locally? Runs `simulate` twice with the same seed and
inner steps — gossip on and `--comm none` — and reports the global eval loss and per-task exact-match
accuracy, plus, per peer, the accuracy on the tasks that make up less than 5% of its own shard.

    .venv/bin/python benchmarks/simulate_comm.py [--topology topologies/ring8.json] [--rounds 5] [--inner-steps 32]

Writes benchmarks/results/simulate_comm.md and .png; prints the headline ratio last.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deca_p2p.config import make_config  # noqa: E402
from deca_p2p.runtime import load_run_inputs  # noqa: E402
from deca_p2p.simulate import simulate  # noqa: E402
from deca_p2p.topology import load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rare_task_accuracy(res, inputs) -> float:
    """Mean accuracy of each peer on the tasks under 5% of its own shard (tasks it barely saw)."""
    accs = []
    for pid, metrics in res.per_peer.items():
        shard = [inputs.train_examples[k].label for k in inputs.shards[pid]]
        for task in sorted({e.label for e in inputs.eval_examples}):
            if shard.count(task) < 0.05 * len(shard):
                accs.append(metrics[f"acc/{task}"])
    return sum(accs) / max(1, len(accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="topologies/ring8.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    topo = load(args.topology)
    rows = {}
    for comm in ("gossip", "none"):
        cfg = make_config(None, {"rounds": args.rounds, "inner_steps": args.inner_steps, "seed": args.seed,
                                 "comm": comm, "threads": 1})
        t0 = time.perf_counter()
        res = simulate(topo, cfg, progress=lambda s: print(f"[{comm}] {s}", flush=True))
        inputs = load_run_inputs(cfg, topo.nodes)
        rows[comm] = (res, rare_task_accuracy(res, inputs), time.perf_counter() - t0)
    tasks = sorted(k for k in rows["gossip"][0].average_model if k.startswith("acc/"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# DECA vs local-only: {topo.name}, {args.rounds} rounds x {args.inner_steps} inner steps, seed {args.seed}",
             "", "Command: `.venv/bin/python benchmarks/simulate_comm.py " +
             f"--topology {args.topology} --rounds {args.rounds} --inner-steps {args.inner_steps} --seed {args.seed}`", "",
             "| run | start eval loss | mean peer eval loss | mean peer acc | " + " | ".join(t[4:] for t in tasks) +
             " | acc on tasks < 5% of own shard | avg-model eval loss | avg-model acc | wall s |",
             "|---" * (8 + len(tasks)) + "|"]
    for comm, (res, rare, wall) in rows.items():
        peers = res.per_peer.values()
        mean = {k: sum(p[k] for p in peers) / len(res.per_peer) for k in ["eval_loss", "acc", *tasks]}
        name = "DECA (gossip)" if comm == "gossip" else "local only (--comm none)"
        lines.append(f"| {name} | {res.initial['eval_loss']:.3f} | {mean['eval_loss']:.3f} | {mean['acc']:.3f} | " +
                     " | ".join(f"{mean[t]:.2f}" for t in tasks) +
                     f" | {rare:.3f} | {res.average_model['eval_loss']:.3f} | {res.average_model['acc']:.3f} | {wall:.0f} |")
    (RESULTS / "simulate_comm.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, (comm, (res, _, _)) in enumerate(rows.items()):
        vals = [sum(p[t] for p in res.per_peer.values()) / len(res.per_peer) for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], vals, width, label=comm)
    ax.set_xticks([i + width / 2 for i in range(len(tasks))], [t[4:] for t in tasks])
    ax.set_ylabel("mean peer exact-match accuracy")
    ax.set_title(f"{topo.name}: DECA gossip vs local only")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "simulate_comm.png", dpi=110)
    print("\n".join(lines))
    loss = {c: sum(p["eval_loss"] for p in r[0].per_peer.values()) / len(r[0].per_peer) for c, r in rows.items()}
    print(f"rare-task accuracy DECA {rows['gossip'][1]:.3f} vs local-only {rows['none'][1]:.3f}; "
          f"eval loss local-only / DECA: {loss['none'] / loss['gossip']:.2f}x")

if __name__ == "__main__":
    main()
