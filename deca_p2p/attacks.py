"""TEST AND BENCHMARK HOOK, never for real use: a peer that publishes a corrupted block (a Byzantine neighbour).

Config key ``attack = "KIND@ID[,ID...]"``: the listed peers replace the block they *send* (θ½, before the
codec and the delta chain) by an attacked one; their own training and their own mix are untouched. The same
spec can go to every peer (``deca-peer cluster --set attack=signflip@3``) and to ``simulate``, which applies
it to the same peers with the same inputs, so the two agree. Kinds (per tensor of the block):

``x<F>``         F·θ½ (``x10``, ``x1000``)
``constant[:C]`` every element C (default 1.0)
``signflip``     −θ½
``gaussian``     Gaussian noise of the tensor's own scale: N(0, rms(θ½)²) per element, seeded by (seed, id, seq)
``dissensus[:E]`` the dissensus attack of ClippedGossip (He, Karimireddy, Jaggi 2022), for one message to all
                 neighbours and what a peer can know: target t = its lowest-id neighbour; with the neighbours'
                 public copies θ̂ of the previous exchange, it sends θ̂_t − E·Σ_{j≠t} (w_j / w_t)(θ̂_j − θ̂_t)
                 (E = 1.5 as in the paper's experiments): the pull of t's neighbourhood, reversed and amplified,
                 at honest-like scale, so clipping does not remove it outright. Its first block of an activation
                 (no copies yet) is honest.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

KINDS = ("x<factor>", "constant[:value]", "signflip", "gaussian", "dissensus[:epsilon]")


def parse(spec: str) -> tuple[str, float, list[int]]:
    """"KIND@ID,ID" -> (kind, parameter, ids); ValueError naming the problem."""
    kind, sep, ids = spec.partition("@")
    if not sep or not ids.strip():
        raise ValueError(f"attack must be KIND@ID[,ID...], got {spec!r}")
    try:
        peers = sorted({int(x) for x in ids.split(",")})
    except ValueError:
        raise ValueError(f"attack: peer ids must be integers, got {ids!r}") from None
    name, _, arg = kind.strip().partition(":")
    try:
        if name.startswith("x") and len(name) > 1 and not arg:
            factor = float(name[1:])
            if not math.isfinite(factor):
                raise ValueError
            return "scale", factor, peers
        if name == "constant":
            return "constant", float(arg) if arg else 1.0, peers
        if name in ("signflip", "gaussian") and not arg:
            return name, 0.0, peers
        if name == "dissensus":
            return "dissensus", float(arg) if arg else 1.5, peers
    except ValueError:
        raise ValueError(f"attack: cannot read {kind!r}") from None
    raise ValueError(f"attack kind must be one of {', '.join(KINDS)}, got {kind!r}")


class Attack:
    """What one attacking peer publishes instead of its θ½ (see the module docstring)."""

    def __init__(self, kind: str, param: float, me: int, row: Mapping[int, float], seed: int = 0):
        self.kind, self.param, self.me, self.row, self.seed = kind, param, me, dict(row), seed

    @torch.no_grad()
    def __call__(self, own: Mapping[str, torch.Tensor], neighbours: Mapping[int, Mapping[str, torch.Tensor] | None],
                 seq: int, first: bool) -> dict[str, torch.Tensor]:
        """own: θ½ by name; neighbours: their public copies as this peer holds them before this exchange
        (None or another block's names: unknown); first: the first exchange of the activation."""
        own = {k: v.detach().to("cpu", torch.float32) for k, v in own.items()}
        if self.kind == "scale":
            return {k: v * self.param for k, v in own.items()}
        if self.kind == "constant":
            return {k: torch.full_like(v, self.param) for k, v in own.items()}
        if self.kind == "signflip":
            return {k: -v for k, v in own.items()}
        if self.kind == "gaussian":
            # below 2**63 for any seed config allows (torch refuses 2**64 and above); unchanged for seeds < ~9e6
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.me) * 1_000_003 + seq) % 2**63)
            return {k: torch.randn(v.shape, generator=g) * v.double().pow(2).mean().sqrt().float()
                    for k, v in own.items()}
        # dissensus
        known = {j: c for j, c in neighbours.items() if c is not None and set(c) == set(own)}
        if first or not known:
            return {k: v.clone() for k, v in own.items()}
        t = min(known)
        others = {j: c for j, c in known.items() if j != t} or {self.me: own}
        out = {}
        for k in own:
            base = known[t][k].double()
            push = torch.zeros_like(base)
            for j in sorted(others):
                w = self.row.get(j, self.row[t])
                push.add_(others[j][k].double() - base, alpha=w / self.row[t])
            out[k] = (base - self.param * push).float()
        return out


def make_attack(cfg, me: int, row: Mapping[int, float]) -> Attack | None:
    """The attack this peer runs, if cfg.attack names it; None for every honest peer."""
    if not cfg.attack:
        return None
    kind, param, ids = parse(cfg.attack)
    return Attack(kind, param, me, row, cfg.seed) if me in ids else None
