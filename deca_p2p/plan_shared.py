"""Step time of a synchronous gossip network whose peers share a host's cores (`make cluster`: 8 peers on 2 cores).

A pure schedule, no sockets: every step of every peer is one job of CPU seconds; a job can start when its peer's
exchange of the previous step has landed (its own previous job done, and every neighbour's block of that step
arrived, ``comm`` seconds after the neighbour sent it); the cores take ready jobs in the order they became ready
(one run queue for the host, as the kernel balances its cores), each job running to its end (a peer computes with a
slice about one step long, timeslice.py; its exchange's CPU is counted in the same job, an approximation). Blocking
gossip sends a block when its step's job ends; ``--overlap`` sends it when the job starts (the gradient is computed
while the block travels). The neighbour relation must be symmetric, every neighbour a key (as topologies are).

The steady-state period lies between the cores' bound (peers x CPU / cores, every core always busy) and the
all-at-once schedule (that, then the exchange); where in between depends on who waits for whom, which this replays
rather than assumes. It is optimistic: no real scheduler knows the next ready job in advance.
"""
from __future__ import annotations

import heapq
from typing import Mapping, Sequence


def shared_cores_step(cpu: float, comm: float, neighbours: Mapping[int, Sequence[int]], cores: int, *,
                      overlap: bool = False, steps: int = 64) -> float:
    """Mean seconds per step, in steady state, of the peers in NEIGHBOURS (peer -> its neighbours) sharing CORES
    cores: each step costs a peer CPU seconds of a core, and a block takes COMM seconds to reach a neighbour."""
    if cores < 1 or steps < 4:
        raise ValueError("cores >= 1 and steps >= 4")
    peers = sorted(neighbours)
    nbrs = {i: list(neighbours[i]) for i in peers}
    start: dict[int, list[float]] = {i: [] for i in peers}
    finish: dict[int, list[float]] = {i: [] for i in peers}
    ready: dict[int, float] = {i: 0.0 for i in peers}   # when the peer's next job may start (known)
    cores_free = [0.0] * cores
    heapq.heapify(cores_free)
    waiting: set[int] = set()                            # peers whose next job's ready time is not known yet

    def sent(j: int, s: int) -> float:
        return (start if overlap else finish)[j][s]

    def try_ready(i: int) -> None:
        s = len(finish[i])                               # the step this peer does next; its exchange is step s - 1
        if s >= steps or i not in waiting:
            return
        if any(len(finish[j]) < s for j in nbrs[i]):
            return                                       # a neighbour has not done step s - 1 yet
        ready[i] = max([finish[i][s - 1]] + [sent(j, s - 1) + comm for j in nbrs[i]])
        waiting.discard(i)

    while any(len(finish[i]) < steps for i in peers):
        free_at = heapq.heappop(cores_free)
        candidates = [i for i in peers if i not in waiting and len(finish[i]) < steps]
        i = min(candidates, key=lambda p: (ready[p], p))  # FIFO: the earliest ready job (always one: synchronous)
        t0 = max(free_at, ready[i])
        start[i].append(t0)
        finish[i].append(t0 + cpu)
        heapq.heappush(cores_free, t0 + cpu)
        waiting.add(i)
        for p in [i, *nbrs[i]]:
            try_ready(p)
    half = steps // 2
    return sum((finish[i][-1] - finish[i][half - 1]) / (steps - half) for i in peers) / len(peers)
