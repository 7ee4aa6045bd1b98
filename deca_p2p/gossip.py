"""One gossip exchange keyed by (round, block, step): send my block, collect my neighbours', mix.

Two forms of a block message (PROTOCOL.md §8):

* lossless codec (``raw``): every block message is θ½ itself, whole. The receiver mixes the decoded frame as it
  is (a view of the received bytes, no copy) and lets it go after the mix: no per-neighbour state, so a peer's
  memory does not grow with its degree, and the mix reads exactly the θ½ its neighbour computed;
* lossy codecs (``bf16``, ``fp16``, ``int8``): a delta against the sender's public copy θ̂_j (public_copy.PublicCopy),
  kept by the sender and every receiver; this is error feedback, what one step's rounding loses the next delta
  still carries. Arriving deltas are applied to θ̂_j at once; a late delta of the current activation is still
  applied so the chain stays intact; a gap asks for a ``resync``, answered with a raw full θ̂_j for that link.

Either way the mix Σ_j w_ij θ_j is summed in neighbour-id order, which makes it bit-identical to the in-process
reference whatever the arrival order. Messages for a later exchange are buffered (a bounded window), messages of a
finished activation are dropped. A neighbour that does not answer within the timeout is left out of that
exchange: its weight goes to the self weight.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import public_copy, wire
from .cpu_parts import CpuParts
from .robust import MixReport, RobustMixer, sq_distance
from .sendbuf import SnapshotPool, share_payloads
from .topology import Topology
from .trainer import Schedule, TrainingDiverged
from .transport import Transport


RESUME_QUIET_S = 2.0  # catch_up: how long after the last resuming position heard to wait for a settled one


@dataclass
class ExchangeResult:
    mixed: list[torch.Tensor]
    arrived: list[int]
    missing: list[int]
    wait_s: float                            # the whole exchange: encode, send, wait for the neighbours, mix (with
    #                                          --overlap: from collect on, what the gradient did not hide)
    disagreement: float                      # sqrt(Σ_j w_ij ‖θ̂_j − θ½_i‖²) over the neighbours mixed in
    neighbour_stats: dict[int, dict] = field(default_factory=dict)
    mix_s: float = 0.0                       # of wait_s: the weighted sum of the blocks
    robust: MixReport | None = None          # what the robust mix did (clipped, flagged neighbours)


@dataclass
class InFlight:
    """An exchange sent and not yet collected."""
    seq: int
    t0: float
    names: list[str]
    own: list[torch.Tensor]  # what the mix reads as our own block
    overlapped: bool = False  # the caller computed in between: only collect's own time counts as waiting


class Gossip:
    def __init__(self, transport: Transport, my_id: int, topo: Topology, schedule: Schedule,
                 block_names: Sequence[Sequence[str]], *, block_shapes: Sequence[Sequence[tuple]] | None = None, codec: str = "raw", inc: int = 0,
                 timeout_s: float = 60.0, window: int = 4, stop: threading.Event | None = None,
                 robust: RobustMixer | None = None, attack=None, zero_copy: bool = False):
        self.tr = transport
        self.me = my_id
        self.neighbours = topo.neighbors(my_id)
        self.row = topo.weight_row(my_id)
        self.schedule = schedule
        self.block_names = [list(n) for n in block_names]
        self.block_shapes = None if block_shapes is None else [[tuple(x) for x in b] for b in block_shapes]
        # nothing legitimate is larger than the biggest block in float32 (the widest wire dtype)
        self.max_payload_bytes = None if block_shapes is None else 4 * max(
            sum(math.prod(x) for x in b) for b in self.block_shapes)
        self.codec = codec
        self.inc = inc
        self.timeout_s = timeout_s
        self.window = window
        self.stop = stop or threading.Event()  # set by a signal handler: stop waiting, mix what has arrived
        self.exact = wire.get_codec(codec).lossless  # send θ½ itself, whole, every time (no delta chain)
        self.own = public_copy.PublicCopy()                # lossy codecs: our public copy θ̂
        self.copies = {j: public_copy.PublicCopy() for j in self.neighbours}  # lossy neighbours' θ̂_j
        self.current: dict[int, dict[str, torch.Tensor]] = {}  # this exchange's block of each neighbour, until mixed
        self.want_base: set[int] = set()  # we asked these for a resync: their raw full block is a new θ̂_j
        self.seen: dict[int, dict[str, torch.Tensor]] = {}  # attack hook only: what each neighbour sent last
        self.buffers = SnapshotPool()  # lossless: the snapshots sent, reused once ZeroMQ is done with them
        # lossless, blocking: send θ½'s own memory, no snapshot. Only for a caller that never changes the tensors it
        # exchanged in place afterwards: peer.py's mix hands the parameters new storage (optim._set_params)
        self.zero_copy = zero_copy
        self.last_seq: dict[int, int | None] = {j: None for j in self.neighbours}
        self.peer_inc: dict[int, int] = {}
        self.pending: dict[int, dict[int, wire.Message]] = {j: {} for j in self.neighbours}
        self.gone: set[int] = set()      # said bye
        self.suspect: set[int] = set()   # missed a deadline: not waited for until they speak again
        self.send_full = True            # next block full to every neighbour (an activation starts)
        self.full_to: set[int] = set()   # next block full to these only (a resync, a restart: PROTOCOL.md §8.2)
        self.dropped: Counter[str] = Counter()
        self.late = 0
        self._activation_start = 0
        self._unusable: set[int] = set()  # answered this exchange, but with a block we could not use
        self.position: int | None = None  # seq of the exchange in progress (or last done)
        self._t_exchange = 0.0
        self.encode_s = 0.0
        self.cpu = CpuParts()  # this thread's CPU in send, receive (to the mix) and mix (cpu_parts.py)
        self.nonfinite_stats = 0  # own stats not sent because they were NaN/Inf (informational only: never fatal)
        self._cfg_noted: set[tuple[int, int]] = set()  # (neighbour, inc) refused for its configuration, said once
        self.robust = robust or RobustMixer(my_id, self.row, "none")  # the mixing rule (robust.py); none: plain
        self.attack = attack  # TEST/BENCHMARK HOOK (attacks.py): transforms only the block this peer sends
        self.waiting = contextlib.nullcontext()  # what the thread runs under while it waits for a block

    # ------------------------------------------------------------------ the exchange
    def begin_activation(self, round_idx: int, block: int) -> None:
        self.own.reset()
        self.seen.clear()
        self.send_full = True
        self.full_to = set()
        self._activation_start = self.schedule.activation_seq(round_idx, block)
        self.robust.begin_activation()

    @torch.no_grad()
    def exchange(self, round_idx: int, block: int, step: int, tensors: dict[str, torch.Tensor],
                 stats: dict[str, float] | None = None) -> ExchangeResult:
        """Send θ½, wait for the neighbours' blocks of the same exchange, mix."""
        return self.collect(self.send(round_idx, block, step, tensors, stats))

    @torch.no_grad()
    def send(self, round_idx: int, block: int, step: int, tensors: dict[str, torch.Tensor],
             stats: dict[str, float] | None = None, *, keep: bool = False) -> InFlight:
        """The first half of an exchange: send our block; `collect` finishes it. keep=True (--overlap, where the
        caller changes its parameters in between): the mix uses a snapshot of `tensors` as they are now."""
        cpu0 = time.thread_time()
        seq = self.schedule.seq(round_idx, block, step)
        self.position = seq
        t0 = time.perf_counter()
        self._t_exchange = time.time()
        full, self.send_full = self.send_full, False
        # lossless: every block is whole already, no link needs a repair
        repair, self.full_to = (set() if full or self.exact else self.full_to - self.gone), set()
        sent_at = time.time()
        published = tensors if self.attack is None else self.attack(
            tensors, {j: self.copies[j].tensors or self.seen.get(j) for j in self.neighbours}, seq,
            seq == self._activation_start)
        out_stats = {**{k: float(v) for k, v in (stats or {}).items() if isinstance(v, (int, float))},
                     "sent_at": sent_at}  # lets a receiver measure the link
        live = self.exact and self.zero_copy and not keep and published is tensors
        if live:
            snap = {k: v.detach() for k, v in tensors.items()}  # θ½ itself goes out (see __init__)
        elif self.exact:  # a private copy goes out zero-copy (and, our own block, is what the mix reads with keep)
            snap = self.buffers.snapshot(published)
        elif keep:  # lossy: the delta goes out; the mix reads this copy
            snap = public_copy.snapshot(published)
        else:
            snap = None
        frames = self._encode_own(snap if self.exact else published, src=self.me, codec=self.codec,
                                  full=full or self.exact, inc=self.inc, round=round_idx, block=block, step=step,
                                  stats=out_stats, check_finite=False)  # receivers scan it; our divergence shows in the loss
        if self.exact:
            frames = share_payloads(frames) if live else self.buffers.track(frames, snap)
        repaired = None
        if repair:  # a full block for these links only: our new public copy itself, raw float32 (decoded exactly,
            # so their copy equals everyone else's after the delta); the other neighbours' chains go on undisturbed
            repaired = wire.encode(wire.Message(
                kind="block", src=self.me, inc=self.inc, round=round_idx, block=block, step=step, codec="raw",
                full=True, tensors={k: v.clone() for k, v in self.own.tensors.items()},
                stats={k: v for k, v in out_stats.items() if math.isfinite(v)}), check_finite=False)
        self.encode_s = time.time() - sent_at  # the receivers' one-way delay includes this; the link does not
        for j in self.neighbours:
            if j not in self.gone:
                self.tr.send(j, repaired if j in repair else frames)
        if not keep:
            own = list(tensors.values())
        elif published is tensors:
            own = list(snap.values())
        else:  # an attacker's own mix reads its true block
            own = list(public_copy.snapshot(tensors).values())
        self.cpu.add("send", time.thread_time() - cpu0)
        return InFlight(seq, t0, list(tensors), own, keep)

    @torch.no_grad()
    def collect(self, fl: InFlight) -> ExchangeResult:
        """The second half of an exchange: wait for the neighbours' blocks (or the timeout), mix."""
        cpu0 = time.thread_time()
        seq, t0, own = fl.seq, fl.t0, fl.own
        t_wait = time.perf_counter() if fl.overlapped else t0
        arrived: dict[int, dict] = {}
        self._unusable = set()
        deadline = t0 + self.timeout_s
        for j in self.neighbours:  # buffered blocks of exchanges we skipped (a rejoin) are of no use now
            for k in [k for k in self.pending[j] if k < seq]:
                del self.pending[j][k]
        while True:
            for j in self.neighbours:  # buffered early arrivals first
                if j not in arrived and seq in self.pending[j]:
                    self._take(j, self.pending[j].pop(seq), seq, arrived)
            waiting = [j for j in self.neighbours
                       if j not in arrived and j not in self.gone and j not in self.suspect and j not in self._unusable]
            left = deadline - time.perf_counter()
            if not waiting or self.stop.is_set() or left <= 0:
                # nobody left to wait for: still read what is already queued (a suspect's block, a resync, a bye)
                got = self.tr.recv(0)
                if got is not None:
                    self._handle(*got, seq=seq, arrived=arrived)
                    continue
                if left <= 0:
                    self.suspect.update(waiting)
                break
            with self.waiting:  # (timeslice.default_slice in a peer: woken, it runs at once)
                got = self.tr.recv(min(left, 0.25))
            if got is not None:
                self._handle(*got, seq=seq, arrived=arrived)
        t_mix = time.perf_counter()
        cpu_mix = time.thread_time()
        self.cpu.add("receive", cpu_mix - cpu0)
        theirs = {j: [self.current[j][k] for k in fl.names] for j in sorted(arrived)}
        # neighbour-id order, self last, the self weight absorbing every missing neighbour (robust.py):
        # float sums do not depend on who arrived first
        mixed = self.robust.mix(own, theirs, seq=seq)
        dist = self.robust.last.distances or {}  # clip and trim measured them already: one pass over each block less
        disagreement = sum(self.row[j] * (dist[j] ** 2 if j in dist else sq_distance(blk, own))
                           for j, blk in theirs.items())
        if self.attack is not None:
            self.seen.update(self.current)
        self.current = {}  # the received frames go now: nothing per neighbour outlives the exchange
        t_end = time.perf_counter()
        self.cpu.add("mix", time.thread_time() - cpu_mix)
        return ExchangeResult(mixed, sorted(arrived), [j for j in self.neighbours if j not in arrived],
                              t_end - t_wait, disagreement ** 0.5, arrived, t_end - t_mix, self.robust.last)

    def _encode_own(self, tensors: dict[str, torch.Tensor], *, stats: dict[str, float], **kw) -> list:
        """Encode this peer's block. Stats are informational: a NaN/Inf one is left out (and counted), never fatal.
        The tensors are not scanned (receivers do it); the one way encoding them can fail is a NaN/Inf that a codec
        cannot carry (int8's scale), i.e. this peer's own parameters blew up: TrainingDiverged (exit 3), as for a
        NaN loss, rather than a traceback."""
        finite = {k: v for k, v in stats.items() if math.isfinite(v)}
        self.nonfinite_stats += len(stats) - len(finite)
        try:
            if self.exact:  # θ½ itself, whole (already our snapshot); no public copy
                kw.pop("full")
                return public_copy.encode_whole(tensors, stats=finite, owned=True, **kw)
            return self.own.encode_block(tensors, stats=finite, **kw)
        except wire.WireError as e:
            raise TrainingDiverged(f"training diverged: this peer's block cannot be sent ({e}); lower --lr and "
                                   "restart (the last checkpoint is kept)") from None

    def alone(self) -> bool:
        """No live neighbour: every neighbour said bye or missed its last deadline (only this peer's block mixes)."""
        return bool(self.neighbours) and all(j in self.gone or j in self.suspect for j in self.neighbours)

    def _tell_position(self, j: int, seq: int | None = None, *, resuming: bool = False) -> None:
        """A restarted neighbour needs to know where the network is, to pick up there. The position hello carries
        the configuration fingerprint too: the restarted peer's barrier counts only hellos that carry one.
        RESUMING marks a restarted peer's own checkpoint position: where it would start, not where it will."""
        seq = self.position if seq is None else seq
        if seq is not None:
            stats = {"seq": float(seq), **({"resuming": 1.0} if resuming else {})}
            self.tr.send(j, wire.encode(wire.Message(kind="hello", src=self.me, inc=self.inc, stats=stats,
                                                     cfg=getattr(self.tr, "hello_cfg", None))))

    def announce(self, seq: int) -> None:
        """A rejoined peer tells every neighbour the exchange it starts at once it has chosen it: a neighbour that
        restarted with it and heard only its checkpoint position is still waiting for this (catch_up)."""
        for j in self.neighbours:
            self._tell_position(j, seq)

    def catch_up(self, timeout_s: float, resume_seq: int | None = None) -> int | None:
        """For a peer that restarted mid-run: the furthest exchange its neighbours are at (from their position
        hellos or block headers), or None if none told within the timeout. Blocks are kept for that exchange.

        RESUME_SEQ, the first exchange this peer will do from its checkpoint, is told to every neighbour first, marked
        `resuming`: a neighbour that restarted too (a whole network restarted) has no exchange of its own to tell, and
        without this both would wait out the timeout. A running neighbour reads it as an ordinary hello.

        A resuming position is only where that neighbour would start: it may hear a running peer further on and
        jump there (then it `announce`s it). So while only resuming positions were heard, this waits RESUME_QUIET_S
        after the last of them before it goes; a running peer's position (or a block) ends it 0.1 s after the line
        goes quiet. Without that, of two restarted neighbours the one that heard no running peer would start an
        activation behind the other, and the two would never exchange a block again."""
        if resume_seq is not None:
            for j in self.neighbours:
                self._tell_position(j, resume_seq, resuming=True)
        deadline = time.perf_counter() + timeout_s
        best: int | None = None
        settled = False  # heard a position that is not only a resuming peer's checkpoint
        t_resuming = 0.0  # when the last resuming position came
        while time.perf_counter() < deadline:
            got = self.tr.recv(0.1 if best is not None else min(0.25, max(0.0, deadline - time.perf_counter())))
            if got is None:
                if best is not None and (settled or time.perf_counter() - t_resuming >= RESUME_QUIET_S):
                    return best  # heard the network and the line is quiet: go
                continue
            src, frames = got
            try:
                msg = wire.decode(frames, max_payload_bytes=self.max_payload_bytes)
            except wire.WireError:
                msg = None
            if msg is None or msg.kind != "block" or src not in self.copies or msg.src != src:
                self._handle(src, frames)  # counts the bad ones, notes hellos and byes
                if msg is not None and msg.kind == "hello" and msg.src == src and src in self.copies:
                    pos = msg.stats.get("seq")
                    if pos is not None and pos == int(pos) and pos >= 0:
                        best = max(best or 0, int(pos))
                        if msg.stats.get("resuming") == 1.0:
                            t_resuming = time.perf_counter()
                        else:
                            settled = True
                continue
            mseq = self.schedule.seq(msg.round, msg.block, msg.step)
            try:
                if mseq is None:
                    raise wire.WireError("position")
                wire.check_names(msg, self.block_names[msg.block],
                                 None if self.block_shapes is None else self.block_shapes[msg.block])
            except wire.WireError as e:
                self._drop(e.reason)
                continue
            self.peer_inc.setdefault(src, msg.inc)
            self.pending[src][mseq] = msg  # taken by the exchange at mseq
            while len(self.pending[src]) > self.window:
                self.pending[src].pop(min(self.pending[src]))
            best = max(best or 0, mseq)
            settled = True  # only a running peer sends blocks
        return best

    def finish(self, timeout_s: float) -> None:
        """Say bye, then keep reading until every neighbour has said bye too (bounded): a slower neighbour may
        still need our last block, which sits in the transport's queue until then."""
        bye = wire.encode(wire.Message(kind="bye", src=self.me, inc=self.inc))
        for j in self.neighbours:  # also to one that said bye first: it waits in its own finish for this answer
            self.tr.send(j, bye)
        deadline = time.perf_counter() + timeout_s
        while any(j not in self.gone for j in self.neighbours) and time.perf_counter() < deadline:
            got = self.tr.recv(min(0.25, max(0.0, deadline - time.perf_counter())))
            if got is not None:
                self._handle(*got)

    # ------------------------------------------------------------------ incoming messages
    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def _handle(self, src: int | None, frames: list, *, seq: int | None = None, arrived=None) -> None:
        t_read = time.time()
        if src is None or src not in self.copies:
            return self._drop("unknown_sender")
        try:
            msg = wire.decode(frames, max_payload_bytes=self.max_payload_bytes)
        except wire.WireError as e:
            return self._drop(e.reason)
        if msg.src != src:
            return self._drop("spoofed_src")
        refused = getattr(self.tr, "cfg_rejected", {}).get((src, msg.inc))
        if refused is not None:  # a restarted neighbour with another configuration: it fails its own barrier
            if (src, msg.inc) not in self._cfg_noted:
                self._cfg_noted.add((src, msg.inc))
                print(f"peer {self.me}: ignoring neighbour {src}'s new incarnation: {refused}", flush=True)
            return self._drop("config")
        msg.received = (t_read, sum(len(f) for f in frames))  # for link measurements
        if self.peer_inc.get(src, msg.inc) != msg.inc:  # the neighbour restarted: its old public copy is void
            self.copies[src].reset()
            self.last_seq[src] = None
            self.pending[src].clear()
            self.full_to.add(src)  # it has no copy of ours either
            self.want_base.discard(src)
            if arrived is not None:
                arrived.pop(src, None)
                self.current.pop(src, None)
            self._tell_position(src)
        self.peer_inc[src] = msg.inc
        if msg.kind == "hello":  # a late start-up hello, or a restart (then the incarnation check above resyncs)
            self.gone.discard(src)
            self.suspect.discard(src)
            return
        if msg.kind == "bye":
            self.gone.add(src)
            return
        if msg.kind == "resync":
            self.full_to.add(src)  # that link only: one neighbour's resync costs the others nothing
            return
        self.gone.discard(src)
        mseq = self.schedule.seq(msg.round, msg.block, msg.step)
        if mseq is None:
            return self._drop("position")
        try:
            shapes = None if self.block_shapes is None else self.block_shapes[msg.block]
            wire.check_names(msg, self.block_names[msg.block], shapes)
        except wire.WireError as e:
            return self._drop(e.reason)
        if seq is not None and mseq > seq:
            if mseq - seq > self.window or len(self.pending[src]) >= self.window:
                return self._drop("too_far_ahead")
            self.pending[src][mseq] = msg
            self.suspect.discard(src)
            return
        if mseq < self._activation_start:
            return self._drop("stale")
        self._take(src, msg, seq, arrived)

    def _take(self, j: int, msg: wire.Message, seq: int | None, arrived) -> None:
        mseq = self.schedule.seq(msg.round, msg.block, msg.step)
        lossless = wire.get_codec(msg.codec).lossless
        if lossless and not msg.full:
            return self._drop("raw_delta")  # PROTOCOL.md §8: a lossless block is always whole
        if lossless and j not in self.want_base and self.copies[j].tensors is None:
            # θ½_j itself, mixed as received (a view of the frame) and kept no longer than the mix. (A raw full block
            # from a lossy neighbour whose chain we follow, or one we asked to resync, is its θ̂_j: the else branch.)
            block = msg.tensors
            self.last_seq[j] = None  # a delta after it has no base here: chain_gap, resync
        else:
            if not msg.full and self.last_seq[j] != mseq - 1:
                self._drop("chain_gap")  # a delta whose predecessor we never applied: ask for a full block
                self.want_base.add(j)    # its answer, a raw full θ̂_j, is the base of the deltas that follow
                self.tr.send(j, wire.encode(wire.Message(kind="resync", src=self.me, inc=self.inc)))
                if mseq == seq:
                    self._unusable.add(j)  # it answered; its repaired block comes next step, don't wait for it now
                return
            try:
                self.copies[j].apply(msg.tensors, msg.full)
            except wire.WireError as e:
                return self._drop(e.reason)
            self.want_base.discard(j)
            block = self.copies[j].tensors
            self.last_seq[j] = mseq
        self.suspect.discard(j)
        if mseq == seq and arrived is not None:
            self.current[j] = block
            arrived[j] = dict(msg.stats)
            if hasattr(msg, "received") and "sent_at" in msg.stats:
                arrived[j]["one_way_s"] = msg.received[0] - msg.stats["sent_at"]
                arrived[j]["nbytes"] = msg.received[1]
                # > 0: read while this peer was waiting for it, so one_way_s is the link's, not our compute's
                arrived[j]["read_after_s"] = msg.received[0] - self._t_exchange
        else:
            self.late += 1
