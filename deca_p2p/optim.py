"""DECA on one active block, and the baselines behind the same small interface.

Pure math: no sockets, no processes. Every optimizer here has the same three calls,
driven by the training loop once per inner step:

    opt.local_step()      # θ_r -> θ½ from p.grad, in place
    opt.mix(mixed)        # θ½ -> θ_{r+1} = Σ_j w_ij θ½_j (computed by the caller, e.g. with MixAccumulator)
    opt.reset()           # on block (re)activation

See DESIGN §2 for the update equations.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

DISCREPANCIES = ("paper", "qg", "consensus", "none")
# elements per float64 temporary where a norm or a distance is summed in float64 (here and in robust.py): a
# whole-tensor copy would cost 8-16 B per element of the largest tensor at the peak (Llama-3-8B's embeddings: 4-8 GB)
F64_CHUNK = 1 << 20


def sum_f64_chunks(chunks: Iterable[torch.Tensor], *, square: bool = True, start: float = 0.0) -> float:
    """start + Σ c² (or Σ c with square=False) over fresh float64 chunks (squared in place). On the CPU each chunk is
    summed by numpy (pairwise, single-threaded: the result does not depend on torch's thread count, so a peer and
    `simulate` agree bit for bit); on a GPU the partial sums stay on the device: one synchronisation per call."""
    total, on_device = start, None
    for c in chunks:
        if c.device.type == "cpu":
            arr = c.numpy()
            if square:
                np.square(arr, out=arr)
            total += float(arr.sum())
        else:
            part = (c.pow_(2) if square else c).sum()
            on_device = part if on_device is None else on_device + part
    return total if on_device is None else total + float(on_device)


def f64_sum(t: torch.Tensor, ref: torch.Tensor | None = None, *, square: bool = True) -> float:
    """Σ (t − ref)² (or Σ t with square=False) in float64, F64_CHUNK elements at a time (sum_f64_chunks); the
    difference is taken in t's dtype, as `t - ref` would be (the DP clip's norm)."""
    flat = t.detach().reshape(-1)
    rflat = None if ref is None else ref.detach().reshape(-1)

    def chunks():
        for lo in range(0, flat.numel(), F64_CHUNK):
            piece = flat[lo:lo + F64_CHUNK] if rflat is None else flat[lo:lo + F64_CHUNK] - rflat[lo:lo + F64_CHUNK]
            yield piece.to(torch.float64, copy=True)

    return sum_f64_chunks(chunks(), square=square)


class GossipOptimizer:
    """Common state: the parameter list and the last step's statistics."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.lr = float(lr)  # the caller may change it between steps (a learning-rate schedule)
        self.weight_decay = float(weight_decay)
        self.last_stats: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        self.step_count = 0

    def local_step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def mix(self, mixed: Sequence[torch.Tensor]) -> None:
        self._set_params(mixed)

    def _set_params(self, mixed: Sequence[torch.Tensor]) -> None:
        """The parameters become `mixed`, which the caller hands over (fresh tensors, not to be used again): a
        parameter takes the new tensor's storage rather than a copy of it. That saves a pass over the block, and it
        leaves the old storage to whoever still reads it: a peer sends θ½ zero-copy (gossip.Gossip, zero_copy),
        and ZeroMQ may still be sending it when the mix lands."""
        if len(mixed) != len(self.params):
            raise ValueError(f"mix got {len(mixed)} tensors for {len(self.params)} parameters")
        for p, new in zip(self.params, mixed):
            if (new.shape == p.shape and new.dtype == p.dtype and new.device == p.device and new.is_contiguous()
                    and new.data_ptr() != p.data_ptr()):
                p.data = new
            else:
                p.copy_(new)

    @torch.no_grad()
    def _decay(self) -> None:
        """Decoupled weight decay (AdamW), before the step; matrices only, as HF's Trainer (no biases, no norms)."""
        if self.weight_decay and self.lr:
            for p in self.params:
                if p.grad is not None and p.ndim >= 2:
                    p.mul_(1.0 - self.lr * self.weight_decay)

    def _grad_norm(self) -> float:
        """‖g‖ over the block, summed in float64 a chunk at a time (a statistic for the log; clipping is torch's)."""
        return math.sqrt(sum(f64_sum(p.grad) for p in self.params if p.grad is not None))


class DSGD(GossipOptimizer):
    """Decentralized SGD: θ½ = θ − γ g, then gossip."""

    @torch.no_grad()
    def local_step(self) -> None:
        self.last_stats = {"grad_norm": self._grad_norm()}
        self._decay()
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)
        self.step_count += 1


class DECA(GossipOptimizer):
    """Decentralized block-wise Adam with block-wise moment approximation (BMA).

    local_step: Adam on the block with α-moments (bias-corrected with the inner step count r+1).
    mix:        θ_{r+1} replaces θ½; the consensus discrepancy h_r is folded into the moments with β.
    `discrepancy` picks the reading of h_r (DESIGN §2): "paper" h = θ_{r+1} − θ_r, "qg" h = (θ_r − θ_{r+1}) / γ,
    "consensus" h = (θ½ − θ_{r+1}) / γ (the consensus pull alone, at gradient scale and sign: "local minus
    aggregated"), "none" no BMA (β1 = β2 = 1: decentralized Adam on the block).
    """

    def __init__(self, params, lr: float, alphas=(0.9, 0.999), betas=(0.9, 0.999), eps: float = 1e-8,
                 discrepancy: str = "paper", weight_decay: float = 0.0):
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"discrepancy must be one of {', '.join(DISCREPANCIES)}, got {discrepancy!r}")
        if discrepancy in ("qg", "consensus") and lr == 0:
            raise ValueError(f"discrepancy {discrepancy!r} divides by the learning rate, which is 0")
        for name, (a, b) in (("alphas", alphas), ("betas", betas)):
            if not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1], got {(a, b)}")
        self.alphas = tuple(float(a) for a in alphas)
        self.betas = (1.0, 1.0) if discrepancy == "none" else tuple(float(b) for b in betas)
        self.eps = float(eps)
        self.discrepancy = discrepancy
        super().__init__(params, lr, weight_decay)

    def reset(self) -> None:
        """Fresh moments: called when the block is (re)activated, as BAdam does."""
        super().reset()
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self._before: list[torch.Tensor] | None = None  # θ_r, kept between local_step and mix

    @torch.no_grad()
    def local_step(self) -> None:
        a1, a2 = self.alphas
        t = self.step_count + 1
        bc1, bc2 = 1.0 - a1 ** t, 1.0 - a2 ** t
        self.last_stats = {"grad_norm": self._grad_norm()}
        self._before = [p.detach().clone() for p in self.params]
        self._decay()
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(a1).add_(g, alpha=1.0 - a1)
            v.mul_(a2).addcmul_(g, g, value=1.0 - a2)
            # Same operation order as torch.optim.Adam, so one peer without BMA matches it to rounding.
            denom = v.sqrt().div_(math.sqrt(bc2)).add_(self.eps)  # in place: one temporary, the same values
            p.addcdiv_(m, denom, value=-self.lr / bc1)
        self.step_count = t

    @torch.no_grad()
    def mix(self, mixed: Sequence[torch.Tensor]) -> None:
        if self._before is None:
            raise RuntimeError("mix() called before local_step()")
        half = [p.detach().clone() for p in self.params] if self.discrepancy == "consensus" else None  # θ½
        self._set_params(mixed)
        b1, b2 = self.betas
        h_sq = 0.0
        for k, (p, before, m, v) in enumerate(zip(self.params, self._before, self.m, self.v)):
            if self.discrepancy in ("qg", "consensus"):
                # a schedule may give lr = 0 (the first warm-up step): no step was taken, so no discrepancy to scale
                ref = before if self.discrepancy == "qg" else half[k]
                h = (ref - p).div_(self.lr) if self.lr else torch.zeros_like(p)
            else:
                h = p - before
            h_sq += f64_sum(h)
            if b1 != 1.0:
                m.mul_(b1).add_(h, alpha=1.0 - b1)
            if b2 != 1.0:
                v.mul_(b2).addcmul_(h, h, value=1.0 - b2)
            del h  # before the next tensor's: one discrepancy tensor at a time (what plan.memory counts)
        self._before = None
        self.last_stats.update(
            h_norm=math.sqrt(h_sq),
            m_norm=math.sqrt(sum(f64_sum(m) for m in self.m)),
            v_mean=sum(f64_sum(v, square=False) for v in self.v) / max(1, sum(v.numel() for v in self.v)),
        )


def make_optimizer(algo: str, params, lr: float, *, alphas=(0.9, 0.999), betas=(0.9, 0.999), eps: float = 1e-8,
                   discrepancy: str = "paper", weight_decay: float = 0.0) -> GossipOptimizer:
    """deca: DECA on the active block; dadam: Adam + gossip on all parameters (no BMA); dsgd: SGD + gossip;
    declora: Adam + gossip (no BMA) on the LoRA adapters, exactly dadam's optimizer on another parameter list."""
    if algo == "deca":
        return DECA(params, lr, alphas, betas, eps, discrepancy, weight_decay)
    if algo in ("dadam", "declora"):
        return DECA(params, lr, alphas, betas, eps, "none", weight_decay)
    if algo == "dsgd":
        return DSGD(params, lr, weight_decay)
    raise ValueError(f"unknown algorithm {algo!r} (choose deca, dadam, dsgd or declora)")


class MixAccumulator:
    """Σ_j w_ij θ_j, one neighbour at a time, in one buffer per tensor of ``dtype`` (default: the block's own).

    Callers add neighbours in id order: float sums depend on order, and a fixed order is what makes a
    networked peer bit-identical to the in-process reference. float32 is the default: against float64 it moved
    final eval losses by noise only and ran ~3x faster (benchmarks/results/mix_precision.md); each term is one
    fused pass (acc += w·θ_j), with no converted copy of θ_j.
    """

    def __init__(self, like: Sequence[torch.Tensor], dtype: torch.dtype | None = None):
        self.like = list(like)
        self.dtype = dtype
        self.acc: list[torch.Tensor] | None = None
        self.weight = 0.0

    def add(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        if self.acc is None:  # the first term: w·θ (equal to 0 + w·θ, bit for bit), no zero-filled pass first
            self.acc = [torch.mul(t.to(o.device, self.dtype or o.dtype), weight) for t, o in zip(tensors, self.like)]
        else:
            for a, t in zip(self.acc, tensors):
                a.add_(t.to(a.device, a.dtype), alpha=weight)
        self.weight += weight

    def result(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        if self.acc is None:
            self.acc = [torch.zeros(o.shape, dtype=self.dtype or o.dtype, device=o.device) for o in self.like]
        return [a.to(dtype) for a in self.acc]  # float32 into float32: the buffer itself, no copy


def overlap_correction(half: Sequence[torch.Tensor], mixed: list[torch.Tensor],
                       sent: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """--overlap (one-step-delayed gossip): θ sent at the start of a step, its gradient step θ½ computed while the
    blocks travel; when they land, θ½ + (mixed − θ), the mix's correction carried over the step. Computed in place
    in `mixed` (the mixer's own fresh buffers). x ← W x − η u(x): combine-then-adapt, stable for any mixing
    matrix (sending θ½ and correcting it one step late would not be: with negative eigenvalues of W it diverges)."""
    return [m.sub_(s).add_(h) for h, m, s in zip(half, mixed, sent)]


def self_weight(row: dict[int, float], me: int, present) -> float:
    """The self weight absorbs every neighbour missing from this exchange: 1 − Σ of those present."""
    return 1.0 - sum(row[j] for j in sorted(present) if j != me)
