"""Robust mixing: bound what one bad neighbour can do to a peer's mix. Pure maths: no sockets, no processes.

Both the networked exchange (gossip.Gossip.exchange) and the in-process reference (simulate.exchange_in_memory)
mix through one ``RobustMixer`` per peer, with the same inputs in the same order (own θ½ and the neighbours'
public copies θ̂_j, neighbour-id order), so `simulate` and real peers stay bit-identical in every mode.

Modes (config ``robust``):

``none``  the plain mix, θ_{r+1} = Σ_j w_ij θ̂_j + w_self θ½_i (optim.MixAccumulator, ids ascending, self last).

``clip``  self-centred clipping (ClippedGossip; He, Karimireddy, Jaggi 2022, arXiv 2202.01545):
          θ_{r+1} = θ½_i + Σ_j w_ij CLIP(θ̂_j − θ½_i, τ_i),  CLIP(z, τ) = z · min(1, τ/‖z‖), ‖·‖ over the whole block.
          Computed as the plain mix of the clipped neighbours θ̃_j = θ½_i + CLIP(θ̂_j − θ½_i, τ) (θ̃_j is θ̂_j
          itself when it is not clipped), so clip with nothing clipped is the plain mix bit for bit. One
          departure from the paper: a block *clipped hard*, farther than HARD_CLIP·τ, is left out of that
          exchange (its weight goes to the self weight, as for a missing neighbour) instead of entering at
          radius τ. Either way a neighbour's influence on the mix is at most w_ij·τ, whatever it sends; leaving
          gross outliers out costs nothing when no honest block is that far, and it removes the coherent pull a
          x1000 / sign-flipped / noise / constant block exerts at radius τ until it is flagged. Measured
          in-process (64 exchanges, the base model): honest peers ended at exactly the "attacker left out from
          the start" result under those four attacks, on ring8 (where clipping alone left them +1 to +2% above
          it) and on exp16 (+0.4 to +4%).
          τ: with ``robust_tau`` > 0, τ = robust_tau · ‖θ½_i‖ (a share of the peer's own block norm: one number
          fits every block). With 0 (default), automatic: τ = TAU_FACTOR × the *lower median* of the distances
          ‖θ̂_j − θ½_i‖ of every neighbour over the last TAU_WINDOW exchanges of the current block activation,
          this one included. The median is over neighbours and exchanges, so one attacker among d neighbours
          supplies at most 1/d of the pool: on a ring (d = 2) exactly half, and the *lower* median is then
          still an honest distance (the largest honest one of the window at worst); an attacker cannot drive
          τ up. The pool is cleared at every activation: DECA's blocks differ in scale (a norm vector against a
          matrix), and a new activation starts a new block.
          TAU_FACTOR = 1.5, measured in-process (ring8, the base model, 4 blocks x 16 exchanges, lr 3e-3; mean
          honest eval loss against the clean run): with 2.0 the dissensus attack got through (its target never
          clipped it hard: +25%), with 1.0 honest neighbours were clipped in 22% of the exchanges without any
          attack (+0.3%) and dissensus cost +9.7%; with 1.5 no honest block was clipped without attack (the mix
          was the plain one, bit for bit) and dissensus cost +5.0%, less than leaving the attacker out from the
          start (+8.5%: its data is lost to the others). On a ring an attacker holds half of a victim's
          neighbour weight, so the factor is the ratio of its pull to an honest neighbour's, at most.
          (The paper's adaptive rule picks τ so that the weight-sum of the largest δ-fraction of neighbours is
          clipped, i.e. the largest distance is always clipped to the next one: that always clips an honest
          neighbour when there is no attacker. The window median costs less without an attack.)
          A peer with a single neighbour cannot tell an attack from honest drift: its τ follows that neighbour.
          Warm-up: at an activation's first exchange (fewer than TAU_WARM exchanges in the pool) the median rule
          is not used: one sample is too few (measured with real peers, ring8, no attack: at the run's very first
          exchange, after Adam's sign-like first step, one honest neighbour was 1.5x farther than the other and
          was clipped, and that single clip moved the run's final eval loss by +2.2%). There τ = COLD_TAU ×
          ‖θ½_i‖: honest peers fine-tuning differ from each other by a few percent of their block's norm, while
          x10, x1000, sign-flip, noise-of-the-block's-scale and constant blocks are at least 1.4x that norm away,
          beyond 2τ: they are still left out from the first exchange on and count towards flagging.
          With DP noise (``--dp-noise σ --dp-clip C``, privacy.py) every release carries N(0, (σC)²) per element,
          so two honest blocks of n elements are about sqrt(2n)·σC apart whatever they learnt: the cold τ is then
          at least TAU_FACTOR × that (the median rule sees the noise in its samples). Without that floor a peer
          whose activations have one or two exchanges (small R) left its honest neighbours out at each first
          exchange and flagged them all by the fourth (an audit found it; tests/test_privacy.py covers it).

``trim``  coordinate-wise trimmed mean over the closed neighbourhood (own θ½ and every θ̂_j that arrived):
          per coordinate, drop the ``robust_trim`` = b largest and b smallest values and average the rest,
          unweighted. Needs 2b + 1 ≤ (neighbours present) + 1; otherwise that exchange is mixed with ``clip``
          (said once in the log). Metropolis weights are not used: on the regular graphs shipped (ring, torus,
          exp, complete) Metropolis W is uniform, 1/(deg+1), over the closed neighbourhood, so trim differs from
          the plain mix only by what it drops; on an irregular graph (star) trim averages the kept values equally.

``robust_exclude`` ("3,5"): neighbours never mixed in, in any mode, as if always missing (an operator's manual
quarantine; `benchmarks/byzantine.py` uses it for its "attacker left out" reference).

Flagging (clip and trim): a neighbour is *clipped hard* at an exchange when ‖θ̂_j − θ½_i‖ > HARD_CLIP·τ (in
trim mode τ is the automatic one, computed for this purpose), or when it is beyond τ and *fast*: its block moved
since the previous exchange of this activation by more than SPEED times as much as the peer's own θ½ did,
‖θ̂_j(t) − θ̂_j(t−1)‖ > SPEED·‖θ½_i(t) − θ½_i(t−1)‖ (only when both blocks of the previous exchange are known, and
the own one moved). Why speed: every honest peer runs the same optimiser on the same block, so between two
exchanges an honest block moves by one local step (Adam: about lr per coordinate, whatever the data) plus its mix
pull, about as much as one's own; measured in-process (ring8, the base model, with and without attacks) honest
neighbours moved 0.64 to 1.63 times as much. The dissensus attack (attacks.py) sends an amplified difference of its
neighbours' copies, θ̂_t − E·(θ̂_j − θ̂_t), which moves 2.5 to 8.6 times as much, while it stays at an honest-like
distance (1 to 3.6 τ: clipped, mostly not hard) and, on a ring, as far as an honest neighbour can be (one
consistently 3x farther than the other must not be flagged: tests/test_robust.py). Before this rule its target on
ring8 mixed it at radius τ in every exchange and never flagged it (honest peers +8.5% mean, +20.5% worst eval
loss against the clean run); with it both neighbours flag it at their 4th exchange (+1.3% / +4.2%, the attacker
left out from the start: +1.2% / +3.7%). Being far or fast alone is not enough: an honest neighbour may be both
farther than τ (heterogeneous data) or, rarely, fast (a slowed-down peer's own mix pull is small), not both
for half of 16 exchanges. A fast block beyond τ is also left out of that exchange, like one beyond HARD_CLIP·τ.
(With plain SGD, algo dsgd, step sizes follow gradient norms and differ between peers more than with Adam; the
measurement above is for DECA's Adam.) To bound memory, the previous blocks are kept as a strided sample of at
most SPEED_SAMPLE elements (every k-th element of each tensor, the same for every peer's block; exact below it). A neighbour clipped hard in at least half of its
last FLAG_WINDOW exchanges (those it took part in; at least FLAG_MIN of them) is *flagged*; the caller logs it
once, the first time. A flagged neighbour is left out of the mix, like a missing one (its weight goes to the self
weight; its distances leave the τ pool), for as long as it stays flagged, even in the exchanges where its block
looks honest (an attacker that alternates); its blocks are still measured, and once fewer than half of its last
FLAG_WINDOW were clipped hard it is mixed again. In trim mode it is what removes the attacker from the set.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .optim import F64_CHUNK, MixAccumulator, self_weight, sum_f64_chunks

ROBUST_MODES = ("none", "clip", "trim")
TAU_WINDOW = 8      # exchanges of the current activation whose neighbour distances set the automatic τ
TAU_FACTOR = 1.5    # automatic τ = TAU_FACTOR × lower median of that pool (README "Faults": why 1.5)
TAU_WARM = 2        # exchanges the pool needs before the median rule applies; before that, τ = COLD_TAU × ‖θ½_i‖
COLD_TAU = 0.25     # (a share of the peer's own block norm: only gross outliers are clipped, see the docstring)
HARD_CLIP = 2.0     # clipped hard: distance > HARD_CLIP · τ (the block shrunk by more than this factor)
FLAG_WINDOW = 16    # flagged: clipped hard in at least half of the neighbour's last FLAG_WINDOW exchanges ...
FLAG_MIN = 4        # ... (of those seen, once at least FLAG_MIN were: a x1000 neighbour is out at its 4th block)
SPEED = 2.0         # "fast": a neighbour's block moved more than SPEED x as much as one's own since the last exchange
SPEED_SAMPLE = 1 << 20  # elements of a block kept (strided) to measure that; the whole block when it is smaller
TRIM_CHUNK = 1 << 20  # elements per (values x elements) sort in trim: memory stays bounded for big blocks


def _f64(t: torch.Tensor, device) -> torch.Tensor:
    """A fresh float64 copy (callers modify it in place; never the caller's own tensor)."""
    return t.detach().to(device=device, dtype=torch.float64, copy=True)


def sq_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor] | None = None) -> float:
    """‖a − b‖² (or ‖a‖²) over a whole block, in float64 on b's device, F64_CHUNK elements at a time (no block- or
    tensor-sized copy: the float64 temporary stays 8 MiB however large the embeddings are).

    On the CPU the sum is numpy's pairwise sum: single-threaded, so it does not depend on torch's thread count
    (a peer and `simulate` may run with different ones) and stays bit-identical between them.
    """
    def diffs(x: torch.Tensor, y: torch.Tensor | None):
        dev = x.device if y is None else y.device
        xs = x.detach().reshape(-1)
        ys = None if y is None else y.detach().reshape(-1)
        for lo in range(0, xs.numel(), F64_CHUNK):
            d = _f64(xs[lo:lo + F64_CHUNK], dev)
            if ys is not None:
                d.sub_(ys[lo:lo + F64_CHUNK])  # widened element by element, exactly: as a float64 copy would be
            yield d

    total = 0.0
    for k, x in enumerate(a):
        total = sum_f64_chunks(diffs(x, None if b is None else b[k]), start=total)  # one running sum, chunk by chunk
    return total


def sample(block: Sequence[torch.Tensor], stride: int) -> list[torch.Tensor]:
    """Every stride-th element of each tensor (flattened), a copy on the CPU in the block's dtype: what `fast`
    compares (sq_distance widens it to float64 exactly, so keeping float64 copies would change no distance and
    cost twice the bytes)."""
    return [t.detach().reshape(-1)[::stride].to("cpu", copy=True) for t in block]


def lower_median(values: Sequence[float]) -> float:
    s = sorted(values)
    return s[(len(s) - 1) // 2]


@dataclass
class MixReport:
    """What one robust mix did (the peer logs it in its step record)."""
    mode: str                                            # the mode used (trim may fall back to clip)
    tau: float | None = None                             # the clipping radius of this exchange
    distances: dict[int, float] = field(default_factory=dict)  # ‖θ̂_j − θ½_i‖ per neighbour mixed in
    clipped: dict[int, float] = field(default_factory=dict)    # j -> ‖θ̂_j − θ½_i‖ / τ for the neighbours clipped
    flagged: list[int] = field(default_factory=list)     # neighbours flagged now (left out of this mix)
    newly_flagged: list[int] = field(default_factory=list)
    speed: dict[int, float] = field(default_factory=dict)      # j -> ‖θ̂_j(t) − θ̂_j(t−1)‖ / ‖θ½_i(t) − θ½_i(t−1)‖
    mixed: list[int] = field(default_factory=list)       # the neighbours whose blocks went into this mix


class RobustMixer:
    """One peer's mixing rule and the statistics it keeps between exchanges (see the module docstring).

    ``mix(own, theirs)``: own = θ½_i (list of tensors), theirs = {j: θ̂_j as a list in the same order}, the
    neighbours that arrived for this exchange. ``begin_activation()`` at every block activation. ``log``
    receives one-line notes (a trim fallback, a neighbour flagged), each said once.
    """

    def __init__(self, me: int, row: Mapping[int, float], mode: str = "none", *, tau: float = 0.0, trim: int = 1,
                 exclude: Sequence[int] = (), log: Callable[[str], None] | None = None,
                 dtype: torch.dtype | None = None, noise_std: float = 0.0):
        if mode not in ROBUST_MODES:
            raise ValueError(f"robust must be one of {', '.join(ROBUST_MODES)}, got {mode!r}")
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"robust_tau must be a finite number >= 0, got {tau}")
        if trim < 1:
            raise ValueError(f"robust_trim must be at least 1, got {trim}")
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
        self.noise_std = float(noise_std)  # DP: the std of the noise in every release, per element (see the docstring)
        self.me, self.row, self.mode, self.tau_rel, self.trim = me, dict(row), mode, float(tau), int(trim)
        self.dtype = dtype  # the mix's accumulator (None: the block's own dtype; optim.MixAccumulator)
        self.exclude = frozenset(exclude)  # never mixed in, in any mode (an operator's manual quarantine)
        self.log = log
        self._said: set[str] = set()
        self._pool: deque[list[float]] = deque(maxlen=TAU_WINDOW)
        self._hist: dict[int, deque[bool]] = {}         # per neighbour: clipped hard, its last FLAG_WINDOW exchanges
        self._flagged: set[int] = set()                  # flagged now: left out of the mix
        self.flag_counts: Counter[int] = Counter()       # exchanges in which each neighbour was flagged
        self.first_flagged: dict[int, int | None] = {}   # neighbour -> seq (or exchange count) when first flagged
        self.exchanges = 0
        self.last = MixReport(mode)
        self._prev: dict[int, list[torch.Tensor]] = {}    # this activation's previous exchange: sampled blocks
        # (own θ½ under key `me`, every neighbour that arrived under its id)

    def begin_activation(self) -> None:
        """A new block: its distances are of another scale, so the τ pool starts afresh (flag history stays)."""
        self._pool.clear()
        self._prev = {}

    def _say(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            if self.log is not None:
                self.log(msg)

    # ------------------------------------------------------------------ the mix
    @torch.no_grad()
    def mix(self, own: Sequence[torch.Tensor], theirs: Mapping[int, Sequence[torch.Tensor]],
            seq: int | None = None) -> list[torch.Tensor]:
        self.exchanges += 1
        order = sorted(j for j in theirs if j not in self.exclude)  # a fixed order: float sums must not depend
        # on who arrived first; an excluded neighbour counts as missing (its weight goes to the self weight)
        if self.mode == "none":
            self.last = MixReport("none", mixed=list(order))
            return self._plain(own, {j: theirs[j] for j in order}, order)
        dist = {j: math.sqrt(sq_distance(theirs[j], own)) for j in order}
        pool = [dist[j] for j in order if j not in self._flagged]  # a flagged neighbour's distances do not count
        if pool:
            self._pool.append(pool)
        all_d = [d for ds in self._pool for d in ds]
        if len(self._pool) >= TAU_WARM:
            auto_tau = TAU_FACTOR * lower_median(all_d)
        else:  # an activation's first exchange: one sample of distances is too few to call an honest one an outlier
            auto_tau = max(COLD_TAU * math.sqrt(sq_distance(own)), self._noise_tau(own))
        if self.tau_rel > 0:
            tau = self.tau_rel * math.sqrt(sq_distance(own))
        else:
            tau = auto_tau
        report = MixReport(self.mode, tau=tau, distances=dist, speed=self._speeds(own, theirs, order))
        self._flag(order, dist, tau if self.mode == "clip" else auto_tau, report, seq)
        use = [j for j in order if j not in self._flagged]  # flagged neighbours are left out, like missing ones
        if self.mode == "trim" and 2 * self.trim + 1 > len(use) + 1:
            self._say(f"robust trim: dropping {self.trim} per side needs 2*{self.trim}+1 = {2 * self.trim + 1} "
                      f"blocks, but only {len(use) + 1} (own + neighbours present, not flagged) were there: mixing "
                      f"with clip instead when that happens")
            report.mode = "clip"
        if report.mode == "clip":
            out = self._clip(own, theirs, use, dist, tau, report)
        else:
            out = self._trimmed(own, theirs, use)
            report.mixed = list(use)
        self.last = report
        return out

    def _noise_tau(self, own) -> float:
        """DP: TAU_FACTOR x the distance the noise alone puts between two honest releases, sqrt(2 n) x noise std."""
        if self.noise_std <= 0:
            return 0.0
        return TAU_FACTOR * math.sqrt(2 * sum(t.numel() for t in own)) * self.noise_std

    def _speeds(self, own, theirs, order) -> dict[int, float]:
        """How far each neighbour's block moved since the previous exchange, relative to the own θ½'s move
        (see "Flagging"); remembers this exchange's blocks for the next one."""
        stride = max(1, math.ceil(sum(t.numel() for t in own) / SPEED_SAMPLE))
        now = {self.me: sample(own, stride), **{j: sample(theirs[j], stride) for j in order}}
        prev, self._prev = self._prev, now
        mine = prev.get(self.me)
        if mine is None or [t.shape for t in mine] != [t.shape for t in now[self.me]]:
            return {}  # the activation's first exchange
        moved = math.sqrt(sq_distance(now[self.me], mine))
        if moved <= 0:
            return {}
        return {j: math.sqrt(sq_distance(now[j], prev[j])) / moved for j in order
                if j in prev and [t.shape for t in prev[j]] == [t.shape for t in now[j]]}

    def _hard(self, j, dist, tau, report) -> bool:
        """Clipped hard: farther than HARD_CLIP·τ, or farther than τ and fast (see "Flagging")."""
        return dist[j] > HARD_CLIP * tau or (dist[j] > tau and report.speed.get(j, 0.0) > SPEED)

    def _plain(self, own, theirs, order) -> list[torch.Tensor]:
        acc = MixAccumulator(own, self.dtype)
        for j in order:
            acc.add(theirs[j], self.row[j])
        acc.add(own, self_weight(self.row, self.me, order))  # the self weight absorbs every missing neighbour
        return acc.result()

    def _clip(self, own, theirs, order, dist, tau, report) -> list[torch.Tensor]:
        acc = MixAccumulator(own, self.dtype)
        mixed = []
        for j in order:
            d = dist[j]
            if d <= tau:
                acc.add(theirs[j], self.row[j])  # untouched: exactly the plain mix's term
                mixed.append(j)
                continue
            s = tau / d  # d > tau >= 0
            report.clipped[j] = d / tau if tau > 0 else math.inf
            if self._hard(j, dist, tau, report):
                continue  # far beyond any honest neighbour, or far and fast: left out of this exchange, its weight
                # to the self weight
            mixed.append(j)
            dt = self.dtype or own[0].dtype  # θ̃_j = θ½ + s (θ̂_j − θ½)
            acc.add([torch.sub(t.to(o.device, dt), o.to(dt)).mul_(s).add_(o.to(dt)) for t, o in zip(theirs[j], own)],
                    self.row[j])
        report.mixed = list(mixed)
        acc.add(own, self_weight(self.row, self.me, mixed))
        return acc.result()

    def _trimmed(self, own, theirs, order) -> list[torch.Tensor]:
        b = self.trim
        sources = [own] + [theirs[j] for j in order]
        m = len(sources)
        out = []
        for k, o in enumerate(own):
            dev = o.device
            flat = [s[k].detach().reshape(-1) for s in sources]
            res = torch.empty(o.numel(), dtype=torch.float64, device=dev)
            for lo in range(0, o.numel(), max(1, TRIM_CHUNK // m)):
                hi = min(o.numel(), lo + max(1, TRIM_CHUNK // m))
                vals = torch.stack([_f64(f[lo:hi], dev) for f in flat]).sort(dim=0).values
                acc = vals[b].clone()
                for r in range(b + 1, m - b):  # element-wise, a fixed order: no thread-count dependence
                    acc.add_(vals[r])
                res[lo:hi] = acc.div_(m - 2 * b)
            out.append(res.reshape(o.shape).to(torch.float32))
        return out

    # ------------------------------------------------------------------ flagging
    def _flag(self, order, dist, tau, report: MixReport, seq) -> None:
        for j in order:
            h = self._hist.setdefault(j, deque(maxlen=FLAG_WINDOW))
            h.append(self._hard(j, dist, tau, report))
        self._flagged = set()
        for j, h in sorted(self._hist.items()):
            n_hard = sum(h)
            if len(h) >= FLAG_MIN and 2 * n_hard >= len(h):
                self._flagged.add(j)
                report.flagged.append(j)
                self.flag_counts[j] += 1
                if j not in self.first_flagged:
                    self.first_flagged[j] = seq if seq is not None else self.exchanges
                    report.newly_flagged.append(j)
                    self._say(f"neighbour {j} flagged: its block was clipped hard (distance > {HARD_CLIP:g} x tau, or "
                              f"> tau and moving > {SPEED:g}x as fast as ours) in {n_hard} of its last {len(h)} "
                              f"exchanges; left out of the mix while flagged")

    def record(self) -> dict:
        """Per-step metrics fields (nothing for robust none)."""
        if self.mode == "none":
            return {}
        r = self.last
        return {"robust": r.mode, "tau": r.tau, "clipped": sorted(r.clipped), "flagged": list(r.flagged)}

    def final_record(self) -> dict:
        if self.mode == "none":
            return {}
        return {"flagged": {str(j): n for j, n in sorted(self.flag_counts.items())},
                "flagged_first": {str(j): s for j, s in sorted(self.first_flagged.items())}}


def parse_ids(text: str) -> list[int]:
    """"3,5" -> [3, 5] (robust_exclude); ValueError naming the problem."""
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"robust_exclude must be peer ids separated by commas, got {text!r}") from None


def make_mixer(cfg, me: int, row: Mapping[int, float], log: Callable[[str], None] | None = None) -> RobustMixer:
    return RobustMixer(me, row, cfg.robust, tau=cfg.robust_tau, trim=cfg.robust_trim,
                       exclude=parse_ids(cfg.robust_exclude), log=log,
                       dtype=torch.float64 if cfg.mix_dtype == "float64" else None,
                       noise_std=cfg.dp_noise * cfg.dp_clip)
