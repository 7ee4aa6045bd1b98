"""The receiving end of an emulated link: a message waits here until the sender's emulated link would have
delivered it. No sockets; transport.py feeds it.

Why at the receiver: a link emulator that holds a message at the sender until its due time, then hands it to
ZeroMQ whole, adds the host's own delivery (loopback TCP, two I/O threads: ~0.7 ms for 0.85 MB here) after the
emulated S/R + L, where a real link overlaps its transmission with that copying. At 1 Gbit/s that capped the
measured goodput at ~0.91 of the configured rate (benchmarks/results/bandwidth_latency.md). So the sender hands a
message to ZeroMQ when its emulated transmission *starts*, stamped with the time the link would deliver it, and
the receiver holds it until then: the host's copying runs inside the emulated transmission time, as on a wire.

The stamp is one frame before the header (PROTOCOL.md §4.5): 0xC1, a byte msgpack never uses (so no header starts
with it), then the due time as a big-endian float64 of Unix seconds. Unix time because the two ends are different
processes, maybe different hosts: on one host it is one clock; across hosts it needs synchronised clocks (NTP).
A stamp cannot hurt anyone but its own sender's messages: a message is held at most MAX_HOLD_S past its arrival,
and each sender at most MAX_HELD_PER_SRC at a time (the earliest goes out early when more arrive); messages from
different senders never wait for each other.
"""

from __future__ import annotations

import heapq
import math
import struct
from typing import Any

STAMP_TAG = 0xC1                # never the first byte of a msgpack object
STAMP_LEN = 9                   # tag + float64
MAX_HOLD_S = 60.0               # a stamp further ahead than this (a skewed clock, a hostile sender) is clamped
MAX_HELD_PER_SRC = 64           # as many as a sender's link queue holds (link.MAX_QUEUED_DATA)

_DUE = struct.Struct(">d")


def stamp_frame(due_unix_s: float) -> bytes:
    """The frame a sender puts before a message's header: deliver it at ``due_unix_s``."""
    return bytes((STAMP_TAG,)) + _DUE.pack(due_unix_s)


def is_stamp(frame: Any) -> bool:
    """Whether ``frame`` (bytes-like) is a stamp frame."""
    mv = memoryview(frame)
    return mv.nbytes == STAMP_LEN and mv[0] == STAMP_TAG


def split_stamp(frames: list) -> tuple[float | None, bool, list]:
    """(due time or None, whether a stamp frame was there, the frames without it). A stamp whose time is not a
    finite number is removed and ignored (the message is then due at once)."""
    if not frames or not is_stamp(frames[0]):
        return None, False, frames
    (due,) = _DUE.unpack(memoryview(frames[0])[1:])
    return (due if math.isfinite(due) else None), True, frames[1:]


class DelayLine:
    """Messages held until their due time, released in due order (ties: arrival order)."""

    def __init__(self, max_hold_s: float = MAX_HOLD_S, max_held_per_src: int = MAX_HELD_PER_SRC):
        self.max_hold_s = float(max_hold_s)
        self.max_held_per_src = int(max_held_per_src)
        self._heap: list[tuple[float, int, Any, Any]] = []   # (due, arrival number, src, item)
        self._held: dict[Any, int] = {}
        self._n = 0
        self.clamped = 0     # stamps more than max_hold_s ahead of their arrival, held only that long
        self.cut_short = 0   # messages released before their due time: their sender had too many held

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, src: Any, item: Any, due: float, now: float) -> bool:
        """Hold ``item`` from ``src`` until ``due``; False (nothing held) when it is due already."""
        if not due > now:
            return False
        if due > now + self.max_hold_s:
            due = now + self.max_hold_s
            self.clamped += 1
        if self._held.get(src, 0) >= self.max_held_per_src:
            self._release_earliest_of(src, now)
        self._n += 1
        heapq.heappush(self._heap, (due, self._n, src, item))
        self._held[src] = self._held.get(src, 0) + 1
        return True

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Any | None:
        """The earliest held item whose time has come, or None."""
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, src, item = heapq.heappop(self._heap)
        self._held[src] -= 1
        if not self._held[src]:
            del self._held[src]
        return item

    def _release_earliest_of(self, src: Any, now: float) -> None:
        i = min((k for k, e in enumerate(self._heap) if e[2] == src), key=lambda k: self._heap[k][:2])
        due, n, _, item = self._heap[i]
        self._heap[i] = (min(due, now), n, src, item)   # due now; still behind anything due earlier
        heapq.heapify(self._heap)
        self.cut_short += 1
