#!/usr/bin/env python
"""Pretrain the shipped base model (``deca_p2p/base_model``) centrally on the pretraining task family.

The model is the embedded default architecture (``deca_p2p.models.DEFAULT_MODEL_CONFIG``: a small LLaMA with a
character tokenizer), randomly initialised from ``--seed`` by ``models.build_default_model``, then trained with
AdamW (linear warm-up, cosine decay) on ``tasks.PRETRAIN_TASKS`` drawn by ``tasks.task_dataset``, batches from
``encoding.Batcher``. At the end it is saved in Hugging Face format (safetensors: float32 if it fits in
``--max-mb``, else bfloat16), reloaded from disk in float32 and scored with ``evaluation.evaluate`` on held-out
examples of both families: the pretraining family (``--eval-per-task`` unseen prompts per task) and the
fine-tuning family (the cluster's common eval set, ``default_dataset(seed=0)``). ``README.md`` and
``pretrain.json`` next to the weights say how it was made and what it scores.

    .venv/bin/python scripts/pretrain_base.py                       # the shipped base (writes deca_p2p/base_model)
    .venv/bin/python scripts/pretrain_base.py --quick --out /tmp/b  # a few steps, seconds: checks the pipeline

Everything is seeded (initial weights, data, batches); on the same torch build and thread count a run repeats
bit for bit. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from deca_p2p import models as M  # noqa: E402
from deca_p2p import tasks as T  # noqa: E402
from deca_p2p.encoding import Batcher  # noqa: E402
from deca_p2p.evaluation import completion_loss, evaluate  # noqa: E402

DEFAULT_OUT = REPO / "deca_p2p" / "base_model"
FT_EVAL_SEED = 0  # the fine-tuning family is scored on the cluster's common eval set: default_dataset(seed=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO)}; "
                   "with --quick a temporary directory)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a share of the peak (cosine)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of the matrices")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--train-per-task", type=int, default=20000)
    p.add_argument("--eval-per-task", type=int, default=200, help="held-out prompts per pretraining task")
    p.add_argument("--ft-eval-per-task", type=int, default=40, help="eval prompts per fine-tuning task")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between progress evaluations (0: none)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a small, shared CPU)")
    p.add_argument("--max-mb", type=float, default=10.0, help="largest model.safetensors kept in float32")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on a small dataset into --out or a temporary directory (pipeline check)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_per_task, args.eval_per_task, args.ft_eval_per_task = 6, 50, 3, 3
        args.warmup, args.eval_every, args.log_every = 2, 0, 2
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="deca-base-quick-")) / "base_model" if args.quick else DEFAULT_OUT
    return args


def lr_at(step: int, args) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def per_task(m: dict, tasks) -> dict[str, float]:
    return {t: round(m.get(f"acc/{t}", float("nan")), 4) for t in tasks}


def fmt_acc(accs: dict[str, float]) -> str:
    return " ".join(f"{t}={a:.2f}" for t, a in accs.items())


def save(model, tok, out: Path, max_mb: float) -> str:
    """Write model + tokenizer to ``out`` (replaced atomically: built next to it, then renamed)."""
    n_params = sum(p.numel() for p in model.parameters())
    dtype = torch.float32 if n_params * 4 <= max_mb * 2**20 - 64 * 1024 else torch.bfloat16
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model = model.to(dtype)
    with M.QuietProgress():
        model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    model.to(torch.float32)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the package data must be readable by all
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(dtype).removeprefix("torch.")


def write_readme(out: Path, info: dict) -> None:
    pre, ft = info["acc_pretrain"], info["acc_finetune"]
    rows = [f"| `{t}` | pretraining | {T_FORMAT[t]} | {pre[t]:.3f} |" for t in pre]
    rows += [f"| `{t}` | fine-tuning | {T_FORMAT[t]} | {ft[t]:.3f} |" for t in ft]
    cfg = info["config"]
    text = f"""# The shipped base model

A small LLaMA-architecture causal LM with a character-level tokenizer, pretrained centrally on the
*pretraining* task family of `deca_p2p/tasks.py` (`PRETRAIN_TASKS`). It is the embedded default model
(`deca_p2p.models.default_model_path()`): `make cluster` fine-tunes it, peer to peer with DECA, on the
disjoint *fine-tuning* family (`TASKS`), whose prompt names it has never seen.

- Architecture: LLaMA, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']},
  {cfg['num_attention_heads']} heads, {cfg['max_position_embeddings']} positions, untied embeddings,
  vocabulary {cfg['vocab_size']} (4 specials + printable ASCII + newline and tab, one token per character):
  **{info['n_params']:,} parameters**, `model.safetensors` {info['file_mb']:.2f} MB in {info['saved_dtype']}
  (load it with any dtype, e.g. `load_model(path, dtype=torch.float32)`).
- Made by (from the repository root; {info['threads']} torch thread(s), torch {info['torch']},
  transformers {info['transformers']}):

  ```sh
  {info['command']}
  ```

  {info['steps']} steps of AdamW (peak lr {info['lr']}, {info['warmup']} warm-up steps, cosine decay to
  {info['min_lr_ratio']}x, weight decay {info['weight_decay']} on matrices, gradient clip {info['clip']}),
  batch {info['batch_size']}, loss on the answer and EOS only, on {info['train_per_task']} generated examples per
  pretraining task (seed {info['seed']}). Wall time seen: {info['wall_s'] / 60:.1f} min ({info['train_s'] / 60:.1f} min
  of training) on a {info['cpus']}-core CPU machine shared with other jobs (load average {info['loadavg_start']:.1f}
  at the start). Final training loss (running mean) {info['final_train_loss']:.4f}.
- Scored after reloading the saved file in float32, with `deca_p2p.evaluation.evaluate` (greedy exact match:
  the answer then EOS): pretraining tasks on {info['eval_per_task']} held-out prompts each (never in its training
  set), fine-tuning tasks on the cluster's common eval set (`default_dataset(seed=0)`,
  {info['ft_eval_per_task']} per task). Pretraining family mean **{info['acc_pretrain_mean']:.3f}** (eval loss
  {info['loss_pretrain']:.3f}); fine-tuning family mean **{info['acc_finetune_mean']:.3f}** (eval loss
  {info['loss_finetune']:.3f}).

| task | family | prompt -> answer | exact match |
|---|---|---|---|
{chr(10).join(rows)}

`pretrain.json` holds the same numbers and every setting. `tests/test_base_model.py` re-checks the bounds
(>= 0.9 on the pretraining family, <= 0.1 on the fine-tuning family) on freshly generated examples.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


T_FORMAT = {
    "copy": "`copy:hello=` -> `hello`", "upper": "`up:abc=` -> `ABC`", "lower": "`low:ABC=` -> `abc`",
    "swap": "`swap:aBc=` -> `AbC`", "first": "`first:hello=` -> `h`", "last": "`last:hello=` -> `o`",
    "len": "`len:hello=` -> `5`", "min": "`min:dbca=` -> `a`", "inc": "`inc:129=` -> `130`",
    "rev": "`rev:abcd=` -> `dcba`", "sort": "`sort:dbca=` -> `abcd`", "add": "`add:12+34=` -> `46`",
    "count": "`cnt:a,abaca=` -> `3`", "dedup": "`dedup:abacbd=` -> `abcd`", "rot": "`rot:abz=` -> `bca`",
}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory(prefix="deca-base-init-") as d:
        init = M.build_default_model(Path(d) / "init", seed=args.seed)
        model, tok = M.load_model(init, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    max_len = model.config.max_position_embeddings

    train, pre_eval = T.task_dataset(T.PRETRAIN_TASKS, args.train_per_task, args.eval_per_task, args.seed)
    _, ft_eval = T.default_dataset(n_train_per_task=0, n_eval_per_task=args.ft_eval_per_task, seed=FT_EVAL_SEED)
    batcher = Batcher(train, tok, args.batch_size, args.seed, max_len=max_len, where="pretraining data")
    print(f"model: {n_params:,} parameters; {len(train)} training examples over {len(T.PRETRAIN_TASKS)} tasks; "
          f"{args.steps} steps of batch {args.batch_size}; out {args.out}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    t_train = time.time()
    running, last_loss = None, float("nan")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = completion_loss(model, batcher.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        last_loss = loss.item()
        running = last_loss if running is None else 0.98 * running + 0.02 * last_loss
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:6d}  loss {running:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{time.time() - t_train:7.0f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            m = evaluate(model, tok, pre_eval, batch_size=128, max_len=max_len)
            print(f"  eval pretraining: acc {m['acc']:.3f} loss {m['eval_loss']:.3f}  "
                  f"{fmt_acc(per_task(m, T.PRETRAIN_TASKS))}", flush=True)
    train_s = time.time() - t_train

    saved_dtype = save(model, tok, args.out, args.max_mb)
    model, tok = M.load_model(args.out, dtype=torch.float32)  # score exactly what was written
    m_pre = evaluate(model, tok, pre_eval, batch_size=128, max_len=max_len)
    m_ft = evaluate(model, tok, ft_eval, batch_size=128, max_len=max_len)
    import transformers

    info = {
        "command": " ".join(["python", "scripts/pretrain_base.py",
                             *[shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]]),
        "config": {k: v for k, v in M.DEFAULT_MODEL_CONFIG.items()},
        "n_params": n_params,
        "file_mb": (args.out / "model.safetensors").stat().st_size / 2**20,
        "saved_dtype": saved_dtype,
        **{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay",
                                         "clip", "train_per_task", "eval_per_task", "ft_eval_per_task", "seed",
                                         "threads")},
        "pretrain_tasks": list(T.PRETRAIN_TASKS),
        "finetune_tasks": list(T.TASKS),
        "final_train_loss": running,
        "acc_pretrain": per_task(m_pre, T.PRETRAIN_TASKS),
        "acc_pretrain_mean": m_pre["acc"],
        "loss_pretrain": m_pre["eval_loss"],
        "acc_finetune": per_task(m_ft, T.TASKS),
        "acc_finetune_mean": m_ft["acc"],
        "loss_finetune": m_ft["eval_loss"],
        "train_s": round(train_s, 1),
        "wall_s": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": load_start,
    }
    (args.out / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    write_readme(args.out, info)
    print(f"pretraining family: acc {m_pre['acc']:.3f}  {fmt_acc(info['acc_pretrain'])}")
    print(f"fine-tuning family: acc {m_ft['acc']:.3f}  {fmt_acc(info['acc_finetune'])}")
    print(f"wrote {args.out} ({info['file_mb']:.2f} MB, {saved_dtype}, {n_params:,} parameters) "
          f"in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
