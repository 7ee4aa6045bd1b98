"""What a peer loads before training, shared by the real peer and the in-process simulation: the model, its
tokenizer, the sequence length, and this peer's own training and evaluation records.

A peer reads only its own files (DESIGN §8). Splitting one file over many peers (Dirichlet over `label`) is a
simulation convenience: `deca-peer split` and `cluster` write per-peer files first, which peers then read as
their own; `simulate` does the same split in memory.
"""
from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .config import CPU_MAX_LEN, GPU_MAX_LEN, ConfigError, TrainConfig
from .data import DataError, Example, dirichlet_split, hold_out, load_jsonl
from .encoding import Batcher
from .evaluation import evaluate
from .models import ensure_default_model, load_model, position_limit
from .tasks import default_dataset
from .trainer import peer_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_FILE, EVAL_FILE = "peer-{}.jsonl", "eval.jsonl"


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


def default_threads(n_local_peers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, n_local_peers))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    return device


# --------------------------------------------------------------------------------------------------
# Data: whose records are where
# --------------------------------------------------------------------------------------------------


@dataclass
class PeerData:
    train: list[Example]
    evals: list[Example]
    source: str          # where the training records came from (the log says it)
    eval_source: str     # and the evaluation records


def label_counts(examples: Sequence[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.label for e in examples).items()))


def split_examples(examples: Sequence[Example], ids: Sequence[int], alpha: float, seed: int,
                   eval_fraction: float, min_size: int = 1) -> tuple[dict[int, list[Example]], list[Example]]:
    """Hold out a stratified `eval_fraction` as a common eval set, then split the rest over `ids` with
    Dirichlet(alpha) label skew, redrawn until every peer has `min_size` records (a batch). What
    `deca-peer split` writes and `simulate --data FILE` uses."""
    train, evals = hold_out(examples, eval_fraction, seed)
    try:
        parts = dirichlet_split([e.label for e in train], len(ids), alpha, seed, min_size=min_size)
    except ValueError as e:  # too little data for this many peers
        raise DataError(str(e)) from None
    return {i: [train[k] for k in part] for i, part in zip(sorted(ids), parts)}, evals


def embedded_data(cfg: TrainConfig, ids: Sequence[int]) -> tuple[dict[int, list[Example]], list[Example]]:
    """The generated default tasks split over the peers (deterministic for the config), and the common eval set."""
    train, evals = default_dataset(cfg.train_per_task, cfg.eval_per_task, cfg.seed)
    try:
        parts = dirichlet_split([e.label for e in train], len(ids), cfg.alpha, cfg.seed, min_size=cfg.batch_size)
    except ValueError as e:
        raise DataError(str(e)) from None
    return {i: [train[k] for k in part] for i, part in zip(sorted(ids), parts)}, evals


def own_data(cfg: TrainConfig, peer_id: int, data_path: str, eval_path: str | None = None) -> PeerData:
    """A peer's own file: all of it trains, unless there is no eval file, then a seeded share is held out."""
    records = load_jsonl(data_path)
    if eval_path:
        return PeerData(records, load_jsonl(eval_path), f"{data_path} (all {len(records)} records)", eval_path)
    train, evals = hold_out(records, cfg.eval_fraction, peer_seed(cfg.seed, peer_id))
    if not evals:
        raise DataError(f"{data_path}: no --eval-data and nothing to hold out for evaluation "
                        f"({len(records)} records, eval_fraction {cfg.eval_fraction}); give --eval-data FILE")
    return PeerData(train, evals, f"{data_path} ({len(train)} of {len(records)} records)",
                    f"{len(evals)} records held out of {data_path} (no --eval-data)")


def write_shards(out_dir: str | Path, shards: dict[int, list[Example]], evals: list[Example]) -> Path:
    from .data import write_jsonl

    out = Path(out_dir)
    for i, ex in shards.items():
        write_jsonl(out / SHARD_FILE.format(i), ex)
    write_jsonl(out / EVAL_FILE, evals)
    return out


def shard_paths(data_dir: str | Path, peer_id: int) -> tuple[Path, Path | None]:
    """A data directory's files for one peer: its shard, and its eval file (own `peer-<id>.eval.jsonl`, else the
    common `eval.jsonl`, else none: then a share of its shard is held out)."""
    d = Path(data_dir)
    train = d / SHARD_FILE.format(peer_id)
    if not train.is_file():
        raise DataError(f"data directory {d} has no {train.name} for peer {peer_id}")
    for name in (f"peer-{peer_id}.eval.jsonl", EVAL_FILE):
        if (d / name).is_file():
            return train, d / name
    return train, None


def network_data(cfg: TrainConfig, ids: Sequence[int], *, data_path=None, data_dir=None) -> dict[int, PeerData]:
    """Every peer's data, for the in-process simulation."""
    if data_dir:
        return {i: own_data(cfg, i, *(str(p) if p else None for p in shard_paths(data_dir, i))) for i in ids}
    if data_path:
        shards, evals = split_examples(load_jsonl(data_path), ids, cfg.alpha, cfg.seed, cfg.eval_fraction,
                                       min_size=cfg.batch_size)
        src = f"shard of {data_path}"
    else:
        shards, evals = embedded_data(cfg, ids)
        src = "shard of the embedded tasks"
    return {i: PeerData(shards[i], evals, f"peer {i}'s {src} ({len(shards[i])} records)", "common eval set") for i in ids}


# --------------------------------------------------------------------------------------------------
# Model and sequence length
# --------------------------------------------------------------------------------------------------


def resolve_max_len(cfg: TrainConfig, model, tokenizer, device: str) -> int:
    """--max-len, or the model's position limit capped for the device; never beyond the position table."""
    limit = position_limit(model, tokenizer)
    cap = GPU_MAX_LEN if device.startswith("cuda") else CPU_MAX_LEN
    if cfg.max_len:
        if limit is not None and cfg.max_len > limit:
            raise ConfigError(f"max_len {cfg.max_len} exceeds the model's {limit} positions")
        return cfg.max_len
    return min(limit or cap, cap)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    max_len: int


def load(cfg: TrainConfig, model_path=None) -> LoadedModel:
    path = Path(model_path) if model_path else ensure_default_model()
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(path, dtype=DTYPES[cfg.dtype], device=device)
    return LoadedModel(model, tokenizer, resolve_max_len(cfg, model, tokenizer, device))


def make_batcher(cfg: TrainConfig, lm: LoadedModel, peer_id: int, data: PeerData) -> Batcher:
    if len(data.train) < cfg.batch_size:
        raise DataError(f"{len(data.train)} training examples in {data.source}, fewer than one "
                        f"batch (--batch-size {cfg.batch_size})")
    return Batcher(data.train, lm.tokenizer, cfg.batch_size, peer_seed(cfg.seed, peer_id), lm.max_len,
                   where=data.source.split(" (")[0])


def evaluate_run(cfg: TrainConfig, model, tokenizer, examples: Sequence[Example], max_len: int) -> dict:
    """`evaluation.evaluate` with the run's evaluation settings (batch, new-token budget) and sequence length."""
    return evaluate(model, tokenizer, examples, batch_size=cfg.eval_batch_size or cfg.batch_size, max_len=max_len,
                    max_new_tokens=cfg.eval_max_new_tokens)


@torch.no_grad()
def average_models(models: Sequence[nn.Module]) -> nn.Module:
    """The network-average model θ̄ (what consensus converges to)."""
    avg = copy.deepcopy(models[0])
    params = [dict(m.named_parameters()) for m in models]
    for name, p in avg.named_parameters():
        p.copy_(torch.stack([ps[name].detach().float() for ps in params]).mean(0).to(p.dtype))
    return avg
