"""What one checkpoint costs a peer: a full save, a later save into the same root as one weight file, and a later
save kept block-sharded that rewrites the changed block's shard alone (checkpoint_reuse.Reuse).

A peer writes a checkpoint after every activation, always the same model into the same root, and between two of
them only the active block changed. Each way saves into its own root, N times in alternation with the others (the
previous checkpoint is deleted after each save, as always); before each save one block's weights change (the next
block each time, as a peer's activations go), and the block-sharded way is told which (`changed`):

* *full*: the reuse plan forgotten before every save (what the first save of a peer's run costs: `save_pretrained`,
  the tokenizer, the weights rewritten block-sharded, every file fsynced);
* *later, one file*: the weights written again whole, the other files linked (a peer's saves before block shards);
* *later, block-sharded*: the changed block's shard written, every other file linked (a peer's saves now).

Two models: the embedded one (float32, with its tokenizer and a peer's `deca_state.json`, as `peer._checkpoint`
saves it) and, unless --no-large, one with Qwen2.5-0.5B's architecture (494 M parameters, random weights, bf16:
~1 GB; 24 one-layer blocks, the frozen embeddings in the rest's shard), fewer times. Wall and CPU time (process_time)
per save, medians.

    .venv/bin/python benchmarks/checkpoint_cost.py [--n 40] [--n-large 6] [--no-large]

Writes benchmarks/results/checkpoint_cost.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine_facts

WAYS = ("full", "later, one file", "later, block-sharded")


def measure(model, tok, blocks: list[tuple[str, ...]], work: Path, n: int, extra: dict) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) per save of each way, N saves each, alternating. Each way saves its own copy of MODEL
    (one block changes between two of its saves, as a peer's would)."""
    import copy

    import torch

    from deca_p2p import checkpoint
    from deca_p2p.checkpoint import save_atomic

    models = {w: copy.deepcopy(model) for w in WAYS}
    named = {w: dict(m.named_parameters()) for w, m in models.items()}
    kw = {"full": {"groups": blocks}, "later, one file": {}, "later, block-sharded": {"groups": blocks}}
    roots = {w: work / f"way{i}" for i, w in enumerate(WAYS)}
    for w in WAYS:
        save_atomic(models[w], tok, roots[w], "warm", extra_files=extra, **kw[w])
    times: dict[str, list[tuple[float, float]]] = {w: [] for w in WAYS}
    for i in range(n):
        for w in WAYS:
            block = blocks[(i * len(WAYS) + WAYS.index(w)) % len(blocks)]
            with torch.no_grad():
                for name in block:
                    named[w][name].add_(1e-3)  # this block trained since the last save
            if w == "full":
                checkpoint._REUSE.pop(str(roots[w]), None)  # this root only
            changed = set(block) if w == "later, block-sharded" else None
            w0, c0 = time.perf_counter(), time.process_time()
            save_atomic(models[w], tok, roots[w], f"a{i:05d}", extra_files=extra, changed=changed, **kw[w])
            times[w].append((time.perf_counter() - w0, time.process_time() - c0))
    for w, r in roots.items():  # the last block-sharded save holds its model exactly (every way: a self-check)
        got = checkpoint.read_weights(checkpoint.latest(r))
        want = models[w].state_dict()
        assert all(torch.equal(t, want[k]) for k, t in got.items()), w
        shutil.rmtree(r, ignore_errors=True)
    return {w: (statistics.median(t for t, _ in v) * 1e3, statistics.median(c for _, c in v) * 1e3)
            for w, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="saves per way, embedded model")
    ap.add_argument("--n-large", type=int, default=6, help="saves per way, Qwen2.5-0.5B's architecture")
    ap.add_argument("--no-large", action="store_true")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deca_p2p.blocks import partition
    from deca_p2p.models import BASE_MODEL_DIR, QuietProgress

    torch.set_num_threads(1)
    state = json.dumps({"activation": 0, "round": 0, "block": 0, "batcher_generator": list(range(5056))})
    # on the disk peers write to (runs/), not tmpfs
    work = Path(tempfile.mkdtemp(prefix=".ckpt-bench-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else ROOT))
    rows = []
    try:
        with QuietProgress():
            model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
        tok = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
        blocks = [b.param_names for b in partition(model)]
        n_params = sum(p.numel() for p in model.parameters())
        rows.append((f"embedded ({n_params / 1e6:.2f} M parameters, float32, {len(blocks)} blocks)", a.n,
                     measure(model, tok, blocks, work, a.n, {"deca_state.json": state})))
        del model
        if not a.no_large:
            from realistic_size import build_model

            with QuietProgress():
                model = AutoModelForCausalLM.from_pretrained(build_model(False), dtype=torch.bfloat16)
            blocks = [b.param_names for b in partition(model)]
            n_params = sum(p.numel() for p in model.parameters())
            rows.append((f"Qwen2.5-0.5B's architecture ({n_params / 1e6:.0f} M parameters, bf16, {len(blocks)} blocks)",
                         a.n_large, measure(model, None, blocks, work, a.n_large, {"deca_state.json": state})))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args = "".join(f" {k}" for k in ([f"--n {a.n}"] if a.n != 40 else []) + ([f"--n-large {a.n_large}"] if a.n_large != 6 else [])
                   + (["--no-large"] if a.no_large else []))
    lines = ["# What one checkpoint costs a peer", "",
             f"Command: `.venv/bin/python benchmarks/checkpoint_cost.py{args}`  ",
             f"Machine: {machine_facts()}  ", f"Run: {time.strftime('%Y-%m-%d %H:%M')}", "",
             "Each way saves into its own root, in alternation; before each save one block changes (the next block each "
             "time). *full*: `save_pretrained` (+ tokenizer), the weights rewritten block-sharded, every file fsynced (a "
             "peer's first save); *later, one "
             "file*: the whole weight file written again, the rest linked (a peer's saves before block shards); *later, "
             "block-sharded*: the changed block's shard written, the rest linked (a peer's saves now). Medians per save.",
             "", "| model | saves per way | way | wall ms | CPU ms | wall vs later, one file |", "|---|---:|---|---:|---:|---:|"]
    heads = []
    for name, n, med in rows:
        ref = med["later, one file"][0]
        for w in WAYS:
            lines.append(f"| {name} | {n} | {w} | {med[w][0]:.1f} | {med[w][1]:.1f} | x{med[w][0] / ref:.2f} |")
        heads.append(f"{name.split(' (')[0]}: block-sharded later save {med['later, block-sharded'][0]:.1f} ms vs "
                     f"one file {ref:.1f} ms (x{med['later, block-sharded'][0] / ref:.2f})")
    lines += ["", "; ".join(heads) + ".", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
