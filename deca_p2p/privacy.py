"""Differential privacy of the shared blocks (`--dp-noise σ --dp-clip C`): clip, add noise, account. No sockets.

What leaves a peer during training is its active block, at every exchange step (a *release*). At each such step
the peer's working copy θ½ of the block (after its local step or steps) is replaced by

    θ̃ = θ_ref + clip(θ½ − θ_ref, C) + N(0, (σC)² I),     clip(x, C) = x · min(1, C / ‖x‖₂)  (over the whole block)

where θ_ref is the block's value at the peer's previous release (after that exchange's mix) or at its activation.
The peer then uses θ̃ itself (sends it, mixes it, trains on from it), so every later value of its parameters, its
checkpoints and its final model are functions of released values and of the data only through the next clipped and
noised change: post-processing.

Accounting. The clipped change lies in the C-ball whatever the data, so changing one training example moves it by
at most 2C (L2 sensitivity 2C): each release is a Gaussian mechanism of noise multiplier z = σC / 2C = σ/2. Releases
compose adaptively (the next change depends on the released past); ε at δ comes from dp-accounting's RDP accountant
over `releases` Gaussian events. No subsampling amplification is claimed: Adam's moments carry every past minibatch
into each change, so each release is charged as if it saw the whole shard. The bound holds for every fixed sequence
of minibatch draws, hence on average over them. Adam's moments (and DECA's BMA, which folds the mixed discrepancy
into them) are local state: never sent, they only shape future changes, which are clipped and noised again.

Scope: example-level privacy of each peer's own data, against its neighbours, anyone who reads the wire, and anyone
who gets its checkpoints or the averaged model. The metrics file and evaluations stay on the peer. With DP on, the
numbers a block message carries are cut to data-independent ones (`public_stats`). Not covered: timing side
channels; floating-point attacks on Gaussian sampling (Mironov 2012). The noise comes from torch's generator seeded
with 63 bits of OS randomness (`secrets`), so neighbours cannot predict it; it is not a CSPRNG (as Opacus' default,
non-secure mode). `dp_seed` makes it reproducible, for tests only.
"""
from __future__ import annotations

import functools
import hashlib
import math
import secrets
from typing import Sequence

import torch

from .optim import f64_sum

PUBLIC_STATS = ("lr", "dp_epsilon", "dp_releases")  # what a block message may still carry with DP on


@torch.no_grad()
def clip_and_noise(params: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], clip: float, noise: float,
                   generator: torch.Generator) -> tuple[float, bool]:
    """In place: params <- ref + clip(params − ref, clip) + N(0, (noise · clip)²). Returns (‖params − ref‖ before
    clipping, whether it was clipped). A change within the radius is left as it is (not recomputed as ref + change,
    which would round), so noise = 0 and a radius never reached change nothing, bit for bit."""
    norm = math.sqrt(sum(f64_sum(p, r) for p, r in zip(params, ref)))  # no tensor-sized float64 copy
    clipped = norm > clip
    if clipped:
        scale = clip / norm
        for p, r in zip(params, ref):
            p.sub_(r).mul_(scale).add_(r)
    if noise > 0:
        for p in params:  # drawn on the CPU in parameter order: the same numbers on any device, in any process
            z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_(z.to(p.device, p.dtype), alpha=noise * clip)
    return norm, clipped


@functools.lru_cache(maxsize=4096)  # every peer of a simulation asks for the same (σ, n, δ) at each step
def epsilon(noise: float, releases: int, delta: float) -> float:
    """ε at δ after `releases` releases of noise multiplier σ = `noise` (accountant multiplier σ/2, see above)."""
    if releases <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise / 2), releases))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target: float, releases: int, delta: float) -> float:
    """The smallest σ (to 1e-6 in σ/2) whose `releases` releases stay within ε = `target` at δ (dp-accounting's own
    calibration: Brent's method over the same accountant, checked to land on the private side)."""
    if not (target > 0 and releases > 0):
        raise ValueError(f"need a target epsilon > 0 and releases > 0, got {target} and {releases}")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    z = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), releases),
        target, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    return 2.0 * z


def generator_seed(dp_seed: int | None, peer_id: int) -> int:
    """OS randomness unless dp_seed is set (tests): then a fixed seed of its own per peer."""
    if dp_seed is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"deca-dp:{dp_seed}:{peer_id}".encode()).digest()[:8], "big") >> 1


def public_stats(stats: dict) -> dict:
    """The numbers a peer may send beside its block with DP on: loss and gradient norms depend on the data."""
    return {k: v for k, v in stats.items() if k in PUBLIC_STATS}


class BlockPrivacy:
    """One peer's mechanism: the reference value of its active block, its noise generator and its release count."""

    def __init__(self, noise: float, clip: float, delta: float, dp_seed: int | None = None, peer_id: int = 0,
                 releases: int = 0):
        self.noise, self.clip, self.delta = float(noise), float(clip), float(delta)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(generator_seed(dp_seed, peer_id))
        self.releases = releases  # a restarted peer starts from what it released before (peer.py)
        self.ref: list[torch.Tensor] | None = None

    def set_reference(self, params: Sequence[torch.Tensor]) -> None:
        """θ_ref: called at activation and after the mix that follows each release."""
        self.ref = [p.detach().clone() for p in params]

    def release(self, params: Sequence[torch.Tensor]) -> dict[str, float]:
        if self.ref is None:
            raise RuntimeError("release() before set_reference()")
        norm, clipped = clip_and_noise(params, self.ref, self.clip, self.noise, self.generator)
        self.releases += 1
        return {"dp_change_norm": norm, "dp_clipped": float(clipped), **self.record()}

    def epsilon(self) -> float:
        return epsilon(self.noise, self.releases, self.delta)

    def record(self) -> dict[str, float]:
        """For every step record (ε is null in JSON when infinite: clipping without noise)."""
        return {"dp_epsilon": self.epsilon(), "dp_releases": self.releases}

    def final_record(self) -> dict[str, float]:
        return {**self.record(), "dp_delta": self.delta, "dp_noise": self.noise, "dp_clip": self.clip}


def make_privacy(cfg, peer_id: int) -> BlockPrivacy | None:
    """None unless clipping is on (dp_clip > 0; dp_noise alone is refused by the config)."""
    if cfg.dp_clip <= 0:
        return None
    return BlockPrivacy(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, cfg.dp_seed, peer_id)
