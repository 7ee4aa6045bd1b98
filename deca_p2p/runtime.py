"""What every peer loads before training, shared by the real peer and the in-process simulation:
the model, the tokenizer, the global eval set and this peer's non-IID shard."""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .data import Batcher, DataError, Example, default_dataset, dirichlet_split, load_jsonl
from .models import ensure_default_model, load_model
from .trainer import peer_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def split_user_data(examples: list[Example], per_label: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out up to `per_label` examples of each label (at most a tenth of it) as the global eval set."""
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    held: set[int] = set()
    rng = random.Random(f"deca-p2p/eval/{seed}")
    for label in sorted(by_label):
        idx = by_label[label]
        held.update(rng.sample(idx, min(per_label, len(idx) // 10)))
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held] or train[: min(len(train), per_label)]
    return train, evals


@dataclass
class PeerSetup:
    examples: list[Example]
    batcher: Batcher


@dataclass
class RunInputs:
    cfg: TrainConfig
    nodes: list[int]
    model: nn.Module
    tokenizer: object
    train_examples: list[Example]
    eval_examples: list[Example]
    shards: dict[int, list[int]]

    def peer(self, peer_id: int) -> PeerSetup:
        ex = [self.train_examples[k] for k in self.shards[peer_id]]
        return PeerSetup(ex, Batcher(ex, self.tokenizer, self.cfg.batch_size, peer_seed(self.cfg.seed, peer_id),
                                     self.cfg.max_len))


def load_run_inputs(cfg: TrainConfig, nodes: Sequence[int], *, model_path=None, data_path=None) -> RunInputs:
    """Deterministic for the config: every peer process computes the same split and keeps its own shard."""
    path = Path(model_path) if model_path else ensure_default_model()
    model, tokenizer = load_model(path, dtype=DTYPES[cfg.dtype], device=resolve_device(cfg.device))
    if data_path:
        train, evals = split_user_data(load_jsonl(data_path), cfg.eval_per_task, cfg.seed)
    else:
        train, evals = default_dataset(cfg.train_per_task, cfg.eval_per_task, cfg.seed)
    nodes = sorted(nodes)
    try:
        parts = dirichlet_split([e.label for e in train], len(nodes), cfg.alpha, cfg.seed)
    except ValueError as e:  # too little data for this many peers
        raise DataError(str(e)) from None
    return RunInputs(cfg, nodes, model, tokenizer, train, evals, dict(zip(nodes, parts)))


@torch.no_grad()
def average_models(models: Sequence[nn.Module]) -> nn.Module:
    """The network-average model θ̄ (what consensus converges to)."""
    avg = copy.deepcopy(models[0])
    params = [dict(m.named_parameters()) for m in models]
    for name, p in avg.named_parameters():
        p.copy_(torch.stack([ps[name].detach().float() for ps in params]).mean(0).to(p.dtype))
    return avg
