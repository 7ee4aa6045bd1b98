"""A realistic-size check on CPU: a model with Qwen2.5-0.5B's architecture, two real peers, DECA vs decentralized
Adam vs decentralized LoRA.

The model is built from the configuration of Qwen/Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings: 494 M parameters), random weights, saved in bfloat16 (nothing
is downloaded); the embedded character tokenizer drives it (its ids fit the table; the logits are still 151936 wide).
Each method runs as `deca-peer cluster` with two real peers on `complete 2` over 127.0.0.1, bf16 working dtype,
embeddings and head frozen (DECA), a few inner steps, batch 2, 64-token sequences. From the peers' metrics:

* bytes per exchange (what a peer sends one neighbour per exchange: fp32 blocks, raw codec);
* seconds per step split into compute (forward, backward, optimizer step), encode, wire (waiting for the neighbour),
  mix (the weighted sum) and apply (BMA and copy-back);
* peak RSS per peer.

Decentralized Adam keeps fp32 master weights, gradients, both moments, public copies and the float64 mix of the
*whole* model: two such peers do not fit this 24 GiB machine. It runs two peers only when the estimate fits; else
one peer alone (`simulate` on one node: no neighbour copies) gives its step time and a lower bound of its memory.

    .venv/bin/python benchmarks/realistic_size.py [--quick]

Writes benchmarks/results/realistic_size.md and .png; prints the headline last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, build_random_model, complete2_topology, machine_facts, spawn, step_split

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")
QUICK_CFG = dict(QWEN25_05B, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8000)
GiB = 1 << 30


def build_model(quick: bool) -> Path:
    """The random-weight model directory (bf16), built once and kept in .deca-cache (git-ignored)."""
    return build_random_model("qwen2.5-0.5b-arch-quick" if quick else "qwen2.5-0.5b-arch",
                              dict(QUICK_CFG if quick else QWEN25_05B, model_type="qwen2"), dtype="bfloat16")


def write_data(root: Path) -> Path:
    """Two peers' own files of the embedded tasks."""
    from deca_p2p.runtime import embedded_data, write_shards
    from deca_p2p.config import make_config

    shards, evals = embedded_data(make_config(None, {"train_per_task": 20, "eval_per_task": 2, "batch_size": 2}),
                                  [0, 1])
    return write_shards(root / "data", shards, evals[:8])


METHODS = {"deca": ["--algo", "deca", "--set", "embeddings_block=false", "--set", "head_block=false"],
           "dadam": ["--algo", "dadam"],
           "declora": ["--algo", "declora"]}


def dadam_estimate_gib(n_params: int) -> float:
    """bf16 model + fp32 master, grad, m, v + own and one neighbour's fp32 public copies + float64 accumulator
    + fp32 mixed result: 2 + 4 x 4 + 4 x 2 + 8 + 4 bytes per parameter."""
    return n_params * (2 + 16 + 8 + 8 + 4) / GiB


def run_cluster(method: str, model: Path, data: Path, work: Path, steps: int, rounds: int) -> dict:
    from deca_p2p.bootstrap import free_base_port

    topo = complete2_topology(work / "c2.json")
    run = work / f"run-{method}"
    cmd = [sys.executable, "-m", "deca_p2p.cli", "cluster", "--topology", str(topo), "--model", str(model),
           "--data-dir", str(data), "--run-dir", str(run), "--no-live", "--no-average", "--dtype", "bfloat16",
           "--rounds", str(rounds), "--inner-steps", str(steps), "--batch-size", "2", "--max-len", "64",
           "--eval-batch-size", "2", "--set", "eval_max_new_tokens=4", "--threads", "1",
           "--base-port", str(free_base_port(2)), "--exchange-timeout", "600", "--hello-timeout", "600",
           *METHODS[method]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": (p.stdout + p.stderr).strip().splitlines()[-1][:300], "wall_s": wall}
    split = step_split(run, (0, 1))
    finals = split.pop("finals")
    return {**split, "peak_rss_mb": max(f["peak_rss_mb"] for f in finals), "wall_s": wall}


def alone_child(method: str, model: str, data: str) -> None:
    """One peer on one node (no neighbours): per-step compute time (its metrics) and peak RSS. `simulate` holds the
    loaded model and the peer's copy of it, so the RSS is one bf16 model (1 GB here) above a lone peer's."""
    from deca_p2p.config import make_config
    from deca_p2p.metrics import records
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load

    cfg = make_config(None, {"algo": method, "dtype": "bfloat16", "rounds": 1, "inner_steps": 2, "batch_size": 2,
                             "max_len": 64, "threads": 1, "eval_max_new_tokens": 4})
    p = Path(data).parent / "c1.json"
    p.write_text(json.dumps({"name": "complete1", "nodes": [0], "edges": [], "weights": "metropolis"}))
    run = Path(data).parent / f"run-{method}-alone"
    t0 = time.perf_counter()
    simulate(load(p), cfg, model_path=model, data_dir=data, run_dir=run)
    steps = records(run, 0, "step")
    print(json.dumps({"peers": 1, "steps": len(steps), "wall_s": time.perf_counter() - t0,
                      "compute_s": statistics.mean(r.get("compute_s") or 0.0 for r in steps),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model of the same family: a smoke run")
    ap.add_argument("--alone", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="rerun only these; the other rows are read from the last run's realistic_size.json")
    args = ap.parse_args()
    if args.alone:
        alone_child(*args.alone)
        return
    sys.path.insert(0, str(ROOT))
    model = build_model(args.quick)
    from deca_p2p.models import load_model
    n_params = sum(p.numel() for p in load_model(model)[0].parameters())
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    name = "realistic_size_quick" if args.quick else "realistic_size"
    saved = RESULTS / f"{name}.json"
    rows = json.loads(saved.read_text()) if saved.exists() else {}
    for method in args.methods.split(","):
        if method == "dadam" and 2 * dadam_estimate_gib(n_params) > 0.8 * psutil.virtual_memory().total / GiB:
            proc = spawn(__file__, ["--alone", method, str(model), str(data)])
            out, _ = proc.communicate()
            rows[method] = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": "failed"}
            # what it would send one neighbour per exchange: every parameter, fp32 (raw codec)
            rows[method]["bytes_per_exchange"] = 4 * n_params
            rows[method]["note"] = (f"bytes computed (every parameter, fp32); two peers need ~{2 * dadam_estimate_gib(n_params):.0f} GiB (estimate) > this "
                                    f"machine's {psutil.virtual_memory().total / GiB:.0f} GiB: one peer alone, no neighbour")
            continue
        rounds, steps = (1, 2)
        rows[method] = run_cluster(method, model, data, work, steps, rounds)
        print(method, rows[method], flush=True)
    lines = ["# Realistic size on CPU: Qwen2.5-0.5B's architecture, two real peers", "",
             f"`.venv/bin/python benchmarks/realistic_size.py{' --quick' if args.quick else ''}`: "
             f"{n_params / 1e6:.0f} M parameters (random weights, bf16 working dtype), batch 2 x 64 tokens, raw codec, "
             "two `deca-peer start` processes on 127.0.0.1 (`cluster`, complete 2, one torch thread each).", "",
             f"Machine: {machine_facts()}", "",
             "| method | peers | bytes / exchange | compute s | encode s | wire s | mix s | apply s | peak RSS / peer (MB) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, r in rows.items():
        if "error" in r:
            lines.append(f"| {m} | | | | | | | | | failed: {r['error']} |")
            continue
        f = lambda k, d=2: f"{r[k]:.{d}f}" if k in r else "–"  # noqa: E731
        lines.append(f"| {m} | {r['peers']} | {r.get('bytes_per_exchange', 0) / 1e6:.1f} MB | {f('compute_s')} | "
                     f"{f('encode_s', 3)} | {f('wire_s', 3)} | {f('mix_s', 3)} | {f('apply_s', 3)} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('note', '')} |")
    ok = {m: r for m, r in rows.items() if "error" not in r}
    headline = "; ".join(f"{m}: peak {r['peak_rss_mb'] / 1024:.1f} GiB/peer" +
                         (f", {r['bytes_per_exchange'] / 1e6:.0f} MB/exchange, {r['compute_s']:.1f} s compute/step"
                          if "compute_s" in r else f" (alone, {r['wall_s']:.0f} s for 2 steps + eval)" + (" (one peer alone)" if r["peers"] == 1 else ""))
                         for m, r in ok.items())
    lines += ["", headline, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(ok), [r["peak_rss_mb"] / 1024 for r in ok.values()], color="#2a7")
    ax.set_ylabel("peak RSS per peer (GiB)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(headline)


if __name__ == "__main__":
    main()
