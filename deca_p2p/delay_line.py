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
The receiver turns it into its own monotonic clock on arrival, so a later step of the wall clock changes nothing.

What a stamp cannot do: overtake (a sender's messages leave the line in the order they came, whatever their
stamps say), delay another sender's messages, or pin unbounded memory (per sender at most MAX_HELD_PER_SRC
messages and MAX_HELD_BYTES_PER_SRC bytes, the earliest going out early when more come; and a message is held at
most MAX_HOLD_S plus its size at MIN_HOLD_RATE past its arrival).
"""

from __future__ import annotations

import heapq
import math
import struct
from typing import Any

STAMP_TAG = 0xC1                # never the first byte of a msgpack object
STAMP_LEN = 9                   # tag + float64
MAX_HOLD_S = 60.0               # a stamp further ahead than this (plus the size term) is clamped ...
MIN_HOLD_RATE = 1e6             # ... bytes/s: an honest link slower than 8 Mbit/s may hold a large block longer
MAX_HELD_PER_SRC = 64           # messages held from one sender at once: its link queue's bound (link.py) ...
MAX_HELD_BYTES_PER_SRC = 1 << 31  # ... and bytes (but always room for the newest)

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
    """Messages held until their due time (one monotonic clock, the caller's), released in due order; one sender's
    always in the order they came."""

    def __init__(self, max_hold_s: float = MAX_HOLD_S, max_held_per_src: int = MAX_HELD_PER_SRC,
                 max_held_bytes_per_src: int = MAX_HELD_BYTES_PER_SRC):
        self.max_hold_s = float(max_hold_s)
        self.max_held_per_src = int(max_held_per_src)
        self.max_held_bytes_per_src = int(max_held_bytes_per_src)
        self._heap: list[tuple[float, int, Any, Any, int]] = []   # (due, arrival number, src, item, nbytes)
        self._held: dict[Any, list[int]] = {}    # src -> [messages in the heap, of them counted, their bytes]
        self._last: dict[Any, float] = {}        # src -> the latest due time in the heap from it
        self._n = 0
        self.clamped = 0     # stamps further ahead than the bound, held only that long
        self.cut_short = 0   # messages released before their due time: their sender had too much held

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, src: Any, item: Any, nbytes: int, due: float | None, now: float) -> bool:
        """Hold ``item`` (``nbytes``) from ``src`` until ``due`` (None: no usable stamp). False, nothing held: it
        may go at once (due already, and nothing of its sender's is waiting, which it must not overtake)."""
        last = self._last.get(src)
        if last is None and (due is None or not due > now):
            return False
        bound = now + self.max_hold_s + nbytes / MIN_HOLD_RATE
        if due is not None and due > bound:
            due = bound
            self.clamped += 1
        due = now if due is None else due
        if last is not None:
            due = max(due, last)           # behind what its sender sent before
        held = self._held.setdefault(src, [0, 0, 0])
        while held[1] and (held[1] >= self.max_held_per_src or held[2] + nbytes > self.max_held_bytes_per_src):
            self._release_earliest_of(src, now)
        self._n += 1
        heapq.heappush(self._heap, (due, self._n, src, item, nbytes))
        held[0] += 1
        held[1] += 1
        held[2] += nbytes
        self._last[src] = due
        return True

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Any | None:
        """The earliest held item whose time has come, or None."""
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, src, item, nbytes = heapq.heappop(self._heap)
        held = self._held[src]
        held[0] -= 1
        if nbytes >= 0:  # not released early (then it was no longer counted)
            held[1] -= 1
            held[2] -= nbytes
        if not held[0]:
            del self._held[src]
            del self._last[src]
        return item

    def _release_earliest_of(self, src: Any, now: float) -> None:
        """Make the earliest held message of ``src`` due now (it stays ahead of its sender's later ones); it no
        longer counts against its sender's bound."""
        i = min((k for k, e in enumerate(self._heap) if e[2] == src and e[4] >= 0), key=lambda k: self._heap[k][:2])
        due, n, _, item, nbytes = self._heap[i]
        self._heap[i] = (min(due, now), n, src, item, -1)  # -1: released, already forgotten
        heapq.heapify(self._heap)
        held = self._held[src]
        held[1] -= 1
        held[2] -= nbytes
        self.cut_short += 1
