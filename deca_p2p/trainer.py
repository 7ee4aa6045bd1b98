"""One peer's training state, free of networking: the same code runs in `simulate` and in a real peer.

The training loop of a peer, top to bottom (DESIGN §2):

    for round, block in schedule:               # every block once per round, same order on all peers
        trainer.activate(block)                 # freeze the rest, fresh moments
        for step in range(R):
            stats = trainer.local_step()        # minibatch gradient on the block, local Adam step -> θ½
                                                # (with DP, at an exchange step: clip + noise, privacy.py)
            mixed = exchange(trainer.block())   # gossip θ½ with the neighbours: Σ_j w_ij θ½_j
            trainer.apply_mix(mixed)            # θ_{r+1}, and BMA folds h_r into the moments
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import lora
from .blocks import ActiveBlock, Block, block_order, partition, whole_model_block
from .config import ConfigError, TrainConfig
from .encoding import Batcher
from .heap import malloc_trim
from .optim import GossipOptimizer, make_optimizer
from .privacy import make_privacy


@dataclass(frozen=True)
class Schedule:
    """The (round, block) activations of a run, and running indices over its inner steps and its exchanges.

    With gossip_every = c a peer exchanges after every c-th inner step and always after the last step of an
    activation (so a block leaves its activation mixed); the steps in between are local only.
    """

    n_blocks: int
    rounds: int
    inner_steps: int
    order: str
    seed: int
    gossip_every: int = 1

    def activations(self) -> list[tuple[int, int]]:
        return [(r, b) for r in range(self.rounds) for b in block_order(self.n_blocks, self.order, r, self.seed)]

    def is_exchange(self, step: int) -> bool:
        return (step + 1) % self.gossip_every == 0 or step == self.inner_steps - 1

    @property
    def exchanges_per_activation(self) -> int:
        return sum(self.is_exchange(s) for s in range(self.inner_steps))

    def _position(self, round_idx: int, block: int, step: int) -> int | None:
        if not (0 <= round_idx < self.rounds and 0 <= block < self.n_blocks and 0 <= step < self.inner_steps):
            return None
        return round_idx * self.n_blocks + block_order(self.n_blocks, self.order, round_idx, self.seed).index(block)

    def step_index(self, round_idx: int, block: int, step: int) -> int | None:
        """Position of inner step (round, block, step) in the run (the x axis of the plots)."""
        pos = self._position(round_idx, block, step)
        return None if pos is None else pos * self.inner_steps + step

    def seq(self, round_idx: int, block: int, step: int) -> int | None:
        """Running index of the exchange after (round, block, step), or None if there is no such exchange."""
        pos = self._position(round_idx, block, step)
        if pos is None or not self.is_exchange(step):
            return None
        return pos * self.exchanges_per_activation + sum(self.is_exchange(s) for s in range(step))

    def activation_seq(self, round_idx: int, block: int) -> int | None:
        """seq of the first exchange of activation (round, block)."""
        pos = self._position(round_idx, block, 0)
        return None if pos is None else pos * self.exchanges_per_activation

    def locate(self, seq: int) -> tuple[int, int, int] | None:
        """(activation index, round, step) of exchange `seq`: where a rejoining peer picks up."""
        per = self.exchanges_per_activation
        a, k = divmod(seq, per)
        acts = self.activations()
        if not 0 <= a < len(acts):
            return None
        steps = [s for s in range(self.inner_steps) if self.is_exchange(s)]
        return a, acts[a][0], steps[k]

    @property
    def total_exchanges(self) -> int:
        return self.rounds * self.n_blocks * self.exchanges_per_activation


def peer_seed(seed: int, peer_id: int) -> int:
    """Each peer draws its own minibatches, reproducibly."""
    return seed * 1_000_003 + peer_id


def make_blocks(model: nn.Module, cfg: TrainConfig) -> list[Block]:
    if cfg.algo == "deca":
        return partition(model, embeddings=cfg.embeddings_block, head=cfg.head_block,
                         layers_per_block=cfg.layers_per_block)
    if cfg.algo == "declora":  # one block of every adapter parameter; the base model stays frozen
        return [Block(0, "lora", lora.adapter_names(model))]
    return [whole_model_block(model)]  # decentralized Adam and DSGD train everything at once


def make_schedule(n_blocks: int, cfg: TrainConfig) -> Schedule:
    return Schedule(n_blocks, cfg.rounds, cfg.inner_steps, cfg.block_order, cfg.seed, cfg.gossip_every)


class TrainingDiverged(RuntimeError):
    """The loss, or the gradient at a finite loss, became NaN/Inf: the run stops before that step changes anything
    (checkpoints stay good)."""


def _all_finite(tensors) -> bool:
    """No NaN/Inf in any of the tensors. A finite float32 sum of each proves it at memory speed (any NaN/Inf makes a
    sum non-finite, and one sync covers them all); only when that sum is not finite (a real NaN/Inf, or large finite
    values overflowing it) does an exact per-element check decide."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return True
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


def lr_factors(cfg: TrainConfig, total_steps: int):
    """step -> learning-rate multiplier of the run's schedule, from ``transformers.get_scheduler``.

    The schedule spans the whole run (every local step of every activation), whatever block is active; the
    optimizer of each activation is fresh, so the factor is read from the scheduler's own lambda by step.
    """
    if cfg.lr_schedule == "constant" and not (cfg.warmup_steps or cfg.warmup_ratio):
        return lambda step: 1.0
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total_steps)
    return sched.lr_lambdas[0]


class PeerTrainer:
    def __init__(self, model: nn.Module, batcher: Batcher, cfg: TrainConfig, peer_id: int = 0):
        if cfg.algo == "declora":
            model = lora.wrap(model, cfg)  # in place; the same adapters on every peer (seeded by cfg.seed)
        self.model = model
        self.batcher = batcher
        self.cfg = cfg
        self.blocks = make_blocks(model, cfg)
        self.schedule = make_schedule(len(self.blocks), cfg)
        self.lr_factor = lr_factors(cfg, self.schedule.rounds * self.schedule.n_blocks * self.schedule.inner_steps)
        self.active: ActiveBlock | None = None
        self.opt: GossipOptimizer | None = None
        self.privacy = make_privacy(cfg, peer_id)  # None unless --dp-clip; peer_id seeds a test-only dp_seed
        self._released = False  # the last local step was a release: its mix sets the next DP reference
        self.device = next(model.parameters()).device
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
            # non-reentrant: gradients reach the active block even when the embeddings before it are frozen
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        model.train()

    def max_block_bytes(self) -> int:
        """The largest block in float32: no legitimate message carries more payload."""
        named = dict(self.model.named_parameters())
        return 4 * max(sum(named[n].numel() for n in b.param_names) for b in self.blocks)

    def activate(self, block: int) -> None:
        if self.active is not None and self.active.block.index == block and len(self.blocks) == 1:
            return  # a single whole-model block keeps its optimizer state across rounds; with several blocks, a
            # block activated twice in a row (random order, across a round boundary) starts fresh, as any other
            # activation does and as a peer resumed between the two would
        if self.active is not None:
            self.active.release()
            self.active = self.opt = None  # the previous block's optimizer state goes now, and its pages back to the
            if self.privacy is not None:   # OS: glibc keeps freed chunks under its (growing) mmap threshold, which
                self.privacy.ref = None    # raised every later activation's peak by the earlier ones'
            malloc_trim()                  # (benchmarks/results/memory.md)
        self.active = ActiveBlock(self.model, self.blocks[block])
        c = self.cfg
        self.opt = make_optimizer(c.algo, self.active.params, c.lr, alphas=c.alphas, betas=c.betas, eps=c.eps,
                                  discrepancy=c.discrepancy, weight_decay=c.weight_decay)
        if self.privacy is not None:
            self.privacy.set_reference(self.active.params)

    def local_step(self, istep: int = 0) -> dict[str, float]:
        """One local step at position `istep` of the run (what the learning-rate schedule reads)."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        c = self.cfg
        losses = []
        for _ in range(c.grad_accum):  # gradients of the micro-batches add up; each loss is scaled to their mean
            batch = {k: v.to(self.device) for k, v in self.batcher.next_batch().items()}
            loss = self.model(**batch).loss
            (loss / c.grad_accum if c.grad_accum > 1 else loss).backward()
            losses.append(loss.detach())  # read after backward is queued, so a GPU does not stall before it
        loss_value = float(sum(losses)) / len(losses)
        if not math.isfinite(loss_value):  # stop before a NaN reaches the moments, a checkpoint or the wire
            raise TrainingDiverged(f"training diverged: the loss is {loss_value}; lower --lr and restart "
                                   "(the last checkpoint is kept)")
        self.active.grads_to_master()
        # A finite loss with a NaN/Inf gradient (parameters blown up, e.g. by a hostile neighbour's block mixed in,
        # or an overflow in a half-precision backward) is a divergence too: skipping the step would leave the same
        # parameters to fail again, so it stops here, before the gradient reaches the moments, a checkpoint or the wire.
        if not _all_finite([p.grad for p in self.active.params]):
            raise TrainingDiverged(f"training diverged: the gradient has NaN/Inf values at a finite loss "
                                   f"({loss_value:.4g}); lower --lr and restart (the last checkpoint is kept)")
        stats = {"loss": loss_value}
        if c.max_grad_norm > 0:
            stats["grad_norm_unclipped"] = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.active.params if p.grad is not None], c.max_grad_norm))
        self.opt.lr = c.lr * self.lr_factor(istep)
        self.opt.local_step()
        stats["lr"] = self.opt.lr
        stats.update(self.opt.last_stats)
        if self.privacy is not None:
            # the release steps are the schedule's exchange steps, read here from the step's position so that the
            # in-process network and a real peer noise exactly the same steps (and with comm none, the final model)
            self._released = self.schedule.is_exchange(istep % self.schedule.inner_steps)
            stats.update(self.privacy.release(self.active.params) if self._released else self.privacy.record())
        stats["compute_s"] = time.perf_counter() - t0
        # this thread's CPU time: below compute_s when peers share cores (the step waited for one)
        stats["compute_cpu_s"] = time.thread_time() - cpu0
        return stats

    def block(self) -> dict[str, torch.Tensor]:
        """θ½ of the active block (fp32), by parameter name."""
        return self.active.tensors()

    def apply_mix(self, mixed: list[torch.Tensor]) -> dict[str, float]:
        self.opt.mix(mixed)
        self.active.master_to_model()
        self.active.zero_grad()
        if self._released:  # the next release's change is measured from this mixed (post-processed) value
            self.privacy.set_reference(self.active.params)
            self._released = False
        return {k: self.opt.last_stats[k] for k in ("h_norm", "m_norm", "v_mean") if k in self.opt.last_stats}

    # ---- checkpoints: the plain HF model others load, and what a restart of this peer needs

    def export_model(self) -> nn.Module:
        """The plain Hugging Face model to save or average: the model itself, or (declora) a copy with the
        adapters merged into the base weights."""
        return lora.merged(self.model) if self.cfg.algo == "declora" else self.model

    def checkpoint_groups(self) -> list[tuple[str, ...]] | None:
        """The tensor groups a checkpoint keeps in shards of their own (checkpoint.save_atomic): the blocks, so that
        a save after an activation rewrites the active block's shard alone; None where every save writes a new
        model anyway (declora exports a merged copy)."""
        return None if self.cfg.algo == "declora" else [b.param_names for b in self.blocks]

    def checkpoint_files(self) -> dict[str, bytes | str]:
        """Files a checkpoint needs beside `export_model()` to resume this trainer exactly (declora: the adapters)."""
        return lora.adapter_files(self.model) if self.cfg.algo == "declora" else {}

    def restore(self, ckpt_dir) -> None:
        """Restore every trained parameter, bit for bit, from a checkpoint written with the two methods above."""
        if self.cfg.algo == "declora":
            lora.restore_adapters(self.model, ckpt_dir)
        else:
            from .checkpoint import restore_weights

            restore_weights(self.model, ckpt_dir)
