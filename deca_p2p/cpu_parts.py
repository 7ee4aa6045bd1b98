"""Where a peer's CPU goes: thread CPU seconds by part of the training loop.

A peer (peer.py) and `simulate` (per simulated peer) time the same parts with the calling thread's CPU clock, so
`benchmarks/cluster_efficiency.py` can put the two side by side: what the networked run adds (sending, receiving,
checkpoints, the transport's threads) and what costs more in it (the same step on a shared core). Thread CPU, not
wall time: a peer that waits for a core or for its neighbours is not charged for it (on a GPU, though, a thread
that waits for the device in a CUDA synchronisation spins, and that counts). Two clock reads per part, a few parts
per step: cheap enough to stay on in every run.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

# the parts, in the order reports list them
PARTS = ("step", "send", "receive", "mix", "apply", "activate", "evaluate", "checkpoint", "log")


class CpuParts:
    """Seconds of the calling thread's CPU (time.thread_time) by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] += time.thread_time() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def record(self) -> dict[str, float]:
        return {k: round(self.seconds[k], 4) for k in sorted(self.seconds, key=_order)}


def _order(name: str) -> tuple[int, str]:
    return (PARTS.index(name) if name in PARTS else len(PARTS), name)
