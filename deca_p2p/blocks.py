"""Partition a causal LM into blocks, order them, and activate one at a time.

A block is a list of parameter names. By default one block per decoder layer; the embeddings (everything
registered before the first layer) and the head (everything after the last layer: final norm, LM head)
are optional extra blocks, frozen otherwise, as BAdam does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

ORDERS = ("ascending", "descending", "random")


@dataclass(frozen=True)
class Block:
    index: int
    name: str
    param_names: tuple[str, ...]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack: the ModuleList of same-typed modules holding the most parameters."""
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = (name, mod), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder layers (no nn.ModuleList of layers)")
    return best


def partition(model: nn.Module, *, embeddings: bool = False, head: bool = False) -> list[Block]:
    prefix, layers = find_layers(model)
    names = [n for n, _ in model.named_parameters()]  # tied weights appear once, where first registered
    layer_of = {}
    for i in range(len(layers)):
        for n, _ in layers[i].named_parameters():
            layer_of[f"{prefix}.{i}.{n}"] = i
    in_layers = [k for k, n in enumerate(names) if n in layer_of]
    first, last = in_layers[0], in_layers[-1]
    blocks: list[tuple[str, list[str]]] = []
    if embeddings and names[:first]:
        blocks.append(("embeddings", names[:first]))
    per_layer: list[list[str]] = [[] for _ in layers]
    for n in names[first:last + 1]:
        if n not in layer_of:
            raise ValueError(f"parameter {n} sits between decoder layers; cannot partition {type(model).__name__}")
        per_layer[layer_of[n]].append(n)
    blocks += [(f"layer.{i}", ps) for i, ps in enumerate(per_layer) if ps]
    if head and names[last + 1:]:
        blocks.append(("head", names[last + 1:]))
    return [Block(i, name, tuple(ps)) for i, (name, ps) in enumerate(blocks)]


def whole_model_block(model: nn.Module) -> Block:
    """All parameters as one block: the decentralized-Adam and DSGD baselines."""
    return Block(0, "all", tuple(n for n, _ in model.named_parameters()))


def block_order(n_blocks: int, order: str, round_idx: int, seed: int) -> list[int]:
    """The activation order of one round; identical on every peer that shares the seed."""
    if order == "ascending":
        return list(range(n_blocks))
    if order == "descending":
        return list(range(n_blocks - 1, -1, -1))
    if order == "random":
        idx = list(range(n_blocks))
        random.Random(f"{seed}:{round_idx}").shuffle(idx)
        return idx
    raise ValueError(f"block order must be one of {', '.join(ORDERS)}, got {order!r}")


class ActiveBlock:
    """One activated block: everything else frozen; the optimizer works on `params` (fp32).

    When the model runs in bf16/fp16, `params` are fp32 master copies; gradients are copied in before the
    optimizer step and the updated masters written back after it. Dropping the object frees them.
    """

    def __init__(self, model: nn.Module, block: Block):
        named = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.block = block
        self.names = list(block.param_names)
        self.model_params = [named[n] for n in self.names]
        for p in self.model_params:
            p.requires_grad_(True)
        self.has_master = any(p.dtype != torch.float32 for p in self.model_params)
        if self.has_master:
            self.params = [p.detach().float().clone() for p in self.model_params]
        else:
            self.params = self.model_params

    def grads_to_master(self) -> None:
        if self.has_master:
            for m, p in zip(self.params, self.model_params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        if self.has_master:
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params + self.model_params:
            p.grad = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params))

    def release(self) -> None:
        self.zero_grad()
        for p in self.model_params:
            p.requires_grad_(False)
        self.params = []
        self.model_params = []
