"""Partition a causal LM into blocks, order them, and activate one at a time.

A block is a list of parameter names. By default one block per decoder layer; the embeddings (every parameter
used before the first layer runs) and the head (everything used after the last layer: final norm, LM head)
are optional extra blocks, frozen otherwise, as BAdam does. "Before" and "after" are execution order, found by
one tiny forward pass, not registration order (OPT registers its final norm before its layers).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

ORDERS = ("ascending", "descending", "random")


@dataclass(frozen=True)
class Block:
    index: int
    name: str
    param_names: tuple[str, ...]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack: the ModuleList of same-typed modules holding the most parameters.

    Where the config names the number of layers (``num_hidden_layers`` / ``n_layer``), a list of exactly that
    length wins over a bigger one (e.g. a list of expert modules inside a layer of a remote-code MoE).
    """
    cfg = getattr(model, "config", None)
    want = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    best, best_key = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size == 0:
                continue
            key = (want is not None and len(mod) == want, size)
            if best_key is None or key > best_key:
                best, best_key = (name, mod), key
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder layers (no nn.ModuleList of layers)")
    return best


def _first_call_order(model: nn.Module, layers: nn.ModuleList) -> tuple[dict[str, int], int, int] | None:
    """Run one tiny forward pass and record when each parameter-owning module is first entered.

    Returns ``(first_call, stack_start, stack_end)``: the event index at which each module (by name) was first
    entered, the index at which the first decoder layer was entered and the one after the last layer returned;
    or None when the model cannot run such a pass (then registration order is all there is).
    """
    clock = [0]
    first_call: dict[str, int] = {}
    stack = [None, None]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def on_enter(name):
        def hook(_mod, _args):
            if name not in first_call:
                first_call[name] = tick()
        return hook

    def layer_enter(_mod, _args):
        t = tick()
        if stack[0] is None:
            stack[0] = t

    def layer_exit(_mod, _args, _out):
        stack[1] = tick()

    handles = []
    try:
        for name, mod in model.named_modules():
            if any(True for _ in mod.parameters(recurse=False)):
                handles.append(mod.register_forward_pre_hook(on_enter(name)))
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(layer_enter))
            handles.append(layer.register_forward_hook(layer_exit))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None) or 2
        param = next(model.parameters())
        ids = torch.tensor([[1 % vocab, 2 % vocab]], device=param.device)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            for m, training in modes:
                m.training = training
    except Exception:  # noqa: BLE001 - a model that cannot run this pass falls back to registration order
        return None
    finally:
        for h in handles:
            h.remove()
    if stack[0] is None or stack[1] is None:
        return None
    return first_call, stack[0], stack[1]


def partition(model: nn.Module, *, embeddings: bool = False, head: bool = False, layers_per_block: int = 1) -> list[Block]:
    """One block per `layers_per_block` consecutive decoder layers (the last may hold fewer), plus optionally the
    embeddings and the head.

    The embeddings block holds exactly the parameters used *before* the decoder-layer stack runs, the head block
    those used *after* it, by execution order: one tiny forward pass (two token ids, no grad, eval mode, RNG
    untouched) records when each module that owns parameters is first entered. Parameters whose module never
    runs in that pass, or whose module encloses the stack (its forward spans it), are placed by registration
    order relative to the layers. Tied weights count once, under the name where they were first registered
    (``named_parameters``): an LM head tied to the input embeddings belongs to the embeddings block.
    """
    prefix, layers = find_layers(model)
    names = [n for n, _ in model.named_parameters()]  # tied weights appear once, where first registered
    layer_of = {}
    for i in range(len(layers)):
        for n, _ in layers[i].named_parameters():
            layer_of[f"{prefix}.{i}.{n}"] = i
    in_layers = [k for k, n in enumerate(names) if n in layer_of]
    first, last = in_layers[0], in_layers[-1]
    order = _first_call_order(model, layers)

    def side(k: int, n: str) -> str:
        """'before' or 'after' the stack, for a parameter outside it."""
        owner = n.rpartition(".")[0]
        encloses = prefix == owner or prefix.startswith(owner + ".") if owner else True
        if order is not None and not encloses and owner in order[0]:
            t, start, end = order[0][owner], order[1], order[2]
            if t < start:
                return "before"
            if t > end:
                return "after"
            raise ValueError(f"parameter {n} is first used inside the decoder-layer stack {prefix}; "
                             f"cannot partition {type(model).__name__}")
        if k < first:
            return "before"
        if k > last:
            return "after"
        raise ValueError(f"parameter {n} sits between decoder layers; cannot partition {type(model).__name__}")

    before, after = [], []
    per_layer: list[list[str]] = [[] for _ in layers]
    for k, n in enumerate(names):
        if n in layer_of:
            per_layer[layer_of[n]].append(n)
        else:
            (before if side(k, n) == "before" else after).append(n)
    blocks: list[tuple[str, list[str]]] = []
    if embeddings and before:
        blocks.append(("embeddings", before))
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
    for i in range(0, len(per_layer), layers_per_block):
        group = per_layer[i: i + layers_per_block]
        ps = [n for layer in group for n in layer]
        if ps:
            blocks.append((f"layer.{i}" if layers_per_block == 1 else f"layers.{i}-{i + len(group) - 1}", ps))
    if head and after:
        blocks.append(("head", after))
    return [Block(i, name, tuple(ps)) for i, (name, ps) in enumerate(blocks)]


def whole_model_block(model: nn.Module) -> Block:
    """All parameters as one block: the decentralized-Adam and DSGD baselines."""
    return Block(0, "all", tuple(n for n, _ in model.named_parameters()))


def order_key(seed: int, round_idx: int, index: int) -> bytes:
    """The sort key of block `index` in round `round_idx` of the `random` order (PROTOCOL.md §7.3): SHA-256 of the
    UTF-8 string ``deca-p2p/order/<seed>/<round>/<index>`` (decimal integers, ``-`` for a negative seed)."""
    return hashlib.sha256(f"deca-p2p/order/{int(seed)}/{int(round_idx)}/{int(index)}".encode()).digest()


@lru_cache(maxsize=256)
def _random_order(n_blocks: int, round_idx: int, seed: int) -> tuple[int, ...]:
    return tuple(sorted(range(n_blocks), key=lambda i: (order_key(seed, round_idx, i), i)))


def block_order(n_blocks: int, order: str, round_idx: int, seed: int) -> list[int]:
    """The activation order of one round; identical on every peer that shares the seed.

    ``random`` is language-independent (since protocol version 2): the block indices sorted by `order_key`, a fresh
    permutation every round; no language's own random number generator is involved.
    """
    if order == "ascending":
        return list(range(n_blocks))
    if order == "descending":
        return list(range(n_blocks - 1, -1, -1))
    if order == "random":
        return list(_random_order(int(n_blocks), int(round_idx), int(seed)))
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
