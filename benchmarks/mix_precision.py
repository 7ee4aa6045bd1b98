"""Does the mix need a float64 accumulator? Speed and training outcome, float32 vs float64, side by side.

1. Speed: one ring peer's mix (own block + 2 neighbours, weights 1/3, ids ascending) of a float32 block of
   16 and 64 MiB through `optim.MixAccumulator`, in float32 and in float64, interleaved, median of repetitions,
   one torch thread.
2. Outcome: the in-process network (`simulate`, ring8, the embedded base and tasks, default settings but
   `--rounds` rounds) once with `mix_dtype=float32` and once with `float64`, same seed: mean-peer and worst-peer
   final eval loss, and the largest relative difference between the two runs' final weights.

    .venv/bin/python benchmarks/mix_precision.py [--rounds 1]

Writes benchmarks/results/mix_precision.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, ROOT, machine_facts

MiB = 1 << 20


def speed(sizes, reps) -> dict:
    import torch

    from deca_p2p.optim import MixAccumulator

    out = {}
    for size in sizes:
        n = size * MiB // 4
        g = torch.Generator().manual_seed(size)
        own, n1, n2 = ([torch.rand(n, generator=g)] for _ in range(3))
        times = {torch.float32: [], torch.float64: []}
        for _ in range(reps + 1):
            for dt in times:
                t0 = time.perf_counter()
                acc = MixAccumulator(own, dt)
                acc.add(n1, 1 / 3)
                acc.add(n2, 1 / 3)
                acc.add(own, 1 / 3)
                acc.result()
                times[dt].append(time.perf_counter() - t0)
        out[size] = {str(dt).replace("torch.", ""): statistics.median(v[1:]) * 1e3 for dt, v in times.items()}
    return out


def outcome(rounds: int) -> dict:
    from deca_p2p.config import make_config
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load

    topo = load(ROOT / "topologies" / "ring8.json")
    runs = {}
    for dt in ("float32", "float64"):
        t0 = time.perf_counter()
        res = simulate(topo, make_config(None, {"rounds": rounds, "mix_dtype": dt, "threads": 1}))
        losses = [r["eval_loss"] for r in res.per_peer.values()]
        runs[dt] = {"mean": statistics.mean(losses), "worst": max(losses), "wall": time.perf_counter() - t0,
                    "weights": {i: {k: v.detach().clone() for k, v in m.named_parameters()} for i, m in res.models.items()}}
    a, b = runs["float32"]["weights"], runs["float64"]["weights"]
    rel = max(float((a[i][k] - b[i][k]).norm() / b[i][k].norm().clamp_min(1e-30)) for i in a for k in a[i])
    for r in runs.values():
        del r["weights"]
    return {"runs": runs, "max_rel_weight_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    sp = speed([16, 64], a.reps)
    oc = outcome(a.rounds)
    cmd = ".venv/bin/python benchmarks/mix_precision.py" + (f" --rounds {a.rounds}" if a.rounds != 1 else "")
    L = ["# Mix accumulator: float32 vs float64", "", f"Command: `{cmd}`  ", f"Machine: {machine_facts()}  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}", "",
         "## Speed: one ring peer's mix (own + 2 neighbours), `optim.MixAccumulator`, 1 thread", "",
         "| block MiB | float32 ms | float64 ms | float64 / float32 |", "|---:|---:|---:|---:|"]
    for s, r in sp.items():
        L.append(f"| {s} | {r['float32']:.1f} | {r['float64']:.1f} | {r['float64'] / r['float32']:.2f}x |")
    L += ["", f"## Outcome: `simulate` ring8, default settings, {a.rounds} round(s), seed 0", "",
          "| accumulator | mean-peer eval loss | worst-peer eval loss | wall s |", "|---|---:|---:|---:|"]
    for dt, r in oc["runs"].items():
        L.append(f"| {dt} | {r['mean']:.4f} | {r['worst']:.4f} | {r['wall']:.0f} |")
    d = oc["runs"]["float32"]["mean"] - oc["runs"]["float64"]["mean"]
    L += ["", f"Largest relative difference between the two runs' final weights (any peer, any tensor, "
          f"‖a − b‖ / ‖b‖): {oc['max_rel_weight_diff']:.2e}; mean-peer eval loss float32 − float64: {d:+.4f}.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mix_precision.md").write_text("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
