"""Peak memory of evaluation versus a training step, on a 32k-vocabulary model with 1000-token examples (CPU).

Issue: evaluation once ran untruncated in batches of 256 (12 examples of 2000 tokens with a 32k vocabulary peaked at
9.3 GB). Now it cuts sequences to --max-len and runs in --eval-batch-size batches, scoring row by row. This measures,
each in a fresh subprocess so peaks never mix, the peak RSS above the loaded model of

* one DECA training step (PeerTrainer.local_step on a decoder-layer block) at batch size B, max_len 1024;
* evaluate() on 12 examples of 1000 tokens, eval batch size B (the default: the training batch size);
* the same evaluation with all 12 examples in one batch (what an unbounded batch costs), for scale.

The model is LLaMA-architecture, built from a config (random init, float32): vocab 32000, hidden 256, 2 layers. The
tokenizer is a 32000-word WordLevel one built here (nothing is downloaded); each example is 1000 tokens of prompt
and completion.

    .venv/bin/python benchmarks/eval_memory.py [--quick]

Writes benchmarks/results/eval_memory.md and .png; prints the headline ratio last.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys

from common import RESULTS, machine_facts, spawn

MiB = 1 << 20
FULL = dict(vocab=32000, hidden=256, layers=2, tokens=1000, n_eval=12, batch=4)
QUICK = dict(vocab=32000, hidden=128, layers=1, tokens=500, n_eval=6, batch=2)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(kind: str, p: dict) -> dict:
    import random

    import psutil
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from deca_p2p.config import make_config
    from deca_p2p.data import Example
    from deca_p2p.encoding import Batcher
    from deca_p2p.evaluation import evaluate
    from deca_p2p.trainer import PeerTrainer

    torch.set_num_threads(2)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(p["vocab"] - 4)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=4 * p["hidden"],
                                         num_hidden_layers=p["layers"], num_attention_heads=4, max_position_embeddings=1024,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(p['vocab'] - 4)}" for _ in range(n))

    n_prompt = p["tokens"] - 2 - 40  # bos + prompt + 40-word completion + eos = tokens
    examples = [Example(words(n_prompt), words(40), "x") for _ in range(p["n_eval"])]
    base = psutil.Process().memory_info().rss / MiB
    if kind == "train":
        cfg = make_config(None, {"batch_size": p["batch"], "rounds": 1, "inner_steps": 1, "max_len": 1024})
        tr = PeerTrainer(model, Batcher(examples, tok, p["batch"], 0, 1024), cfg)
        tr.activate(1)  # a decoder layer
        tr.local_step(0)
    else:
        bs = p["batch"] if kind == "eval" else len(examples)
        m = evaluate(model, tok, examples, batch_size=bs, max_len=1024, max_new_tokens=8)
        assert m["eval_tokens"] > 0
    return {"kind": kind, "base_mib": base, "peak_mib": _peak_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(child(args.child, p)))
        return
    rows = {}
    for kind in ("train", "eval", "eval-one-batch"):
        proc = spawn(__file__, ["--child", kind] + (["--quick"] if args.quick else []))
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"child {kind} failed")
        rows[kind] = json.loads(out.strip().splitlines()[-1])
    label = {"train": f"training step (batch {p['batch']}, one decoder layer active)",
             "eval": f"evaluate, eval batch {p['batch']} (the default)",
             "eval-one-batch": f"evaluate, all {p['n_eval']} examples in one batch"}
    extra = {k: r["peak_mib"] - r["base_mib"] for k, r in rows.items()}
    lines = [
        "# Evaluation memory vs a training step",
        "",
        f"`.venv/bin/python benchmarks/eval_memory.py{' --quick' if args.quick else ''}`: LLaMA-architecture model, "
        f"vocab {p['vocab']}, hidden {p['hidden']}, {p['layers']} layers, float32, CPU; {p['n_eval']} examples of "
        f"{p['tokens']} tokens, max_len 1024. Each row is a fresh process; peak RSS from getrusage.",
        "",
        f"Machine: {machine_facts()}",
        "",
        "| what | RSS with model loaded (MiB) | peak RSS (MiB) | peak above the model (MiB) | vs training step |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, r in rows.items():
        lines.append(f"| {label[k]} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {extra[k]:.0f} | "
                     f"{extra[k] / extra['train']:.2f}x |")
    headline = (f"evaluation at the default batch peaks at {extra['eval'] / extra['train']:.2f}x a training step's "
                f"memory above the model ({extra['eval']:.0f} vs {extra['train']:.0f} MiB); one unbounded batch: "
                f"{extra['eval-one-batch'] / extra['train']:.2f}x")
    lines += ["", headline, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "eval_memory_quick" if args.quick else "eval_memory"
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([label[k] for k in rows], [extra[k] for k in rows], color=["#555", "#2a7", "#c52"])
    ax.set_xlabel("peak RSS above the loaded model (MiB)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(headline)


if __name__ == "__main__":
    main()
