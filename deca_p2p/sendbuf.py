"""Buffers for blocks sent whole: a snapshot of θ½ that ZeroMQ sends zero-copy, reused once ZeroMQ has let it go.

A lossless peer sends θ½ itself every exchange (PROTOCOL.md §8.1), and must hand ZeroMQ a private copy: the frames go
out while the peer trains on. A fresh buffer of tens of MB is page-faulted in at a fifth of memory speed
(benchmarks/results/wire_throughput.md, memcpy fresh vs warm), so the copies are kept and reused: each payload goes
out as a tracked ``zmq.Frame`` (one per tensor, shared by every neighbour's send), and a snapshot is reused only when
all its trackers say ZeroMQ is done with it.
"""
from __future__ import annotations

from typing import Mapping

import torch
import zmq

from . import public_copy

SPARES = 2  # snapshots kept: the one in flight and one free (memory: two blocks, whatever the degree)


class SnapshotPool:
    def __init__(self, spares: int = SPARES):
        self.spares = spares
        self._kept: list[tuple[dict[str, torch.Tensor], list]] = []

    def snapshot(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A private float32 copy of `tensors`: a released spare of the same layout when there is one, else new."""
        for n, (snap, trackers) in enumerate(self._kept):
            if all(t.done for t in trackers) and snap.keys() == tensors.keys() and all(
                    snap[k].shape == v.shape for k, v in tensors.items()):
                del self._kept[n]
                for k, v in tensors.items():
                    snap[k].copy_(v.detach())
                return snap
        return public_copy.snapshot(tensors)

    def track(self, frames: list, snap: dict[str, torch.Tensor]) -> list:
        """`frames` (a header and payload views of `snap`) with the payloads as tracked zmq.Frames; `snap` becomes a
        spare, reusable once every send of those frames is done."""
        # every payload tracked, the small ones too: a send still queued on an emulated link copies them only then
        payload = [zmq.Frame(f, copy=False, track=True) for f in frames[1:]]
        self._kept.append((snap, [f.tracker for f in payload]))
        del self._kept[:-self.spares]  # the oldest go (one still in flight on a slow link is garbage once sent)
        return [frames[0], *payload]


def share_payloads(frames: list) -> list:
    """`frames` (a header, then payload buffers that nobody writes to again) with each payload that ZeroMQ would not
    copy anyway as one zero-copy ``zmq.Frame``, shared by every neighbour's send.

    When ZeroMQ lets a zero-copy buffer go, its free callback tells pyzmq's garbage-collector thread, which wakes to
    drop the reference. Sent as plain buffers, each neighbour's send makes a Frame of its own: a wake-up per payload
    per neighbour. A shared Frame is let go once, whatever the degree. Payloads under the socket's copy threshold
    (``zmq.COPY_THRESHOLD``) stay plain buffers, which ``send_multipart(copy=False)`` copies as it sends them."""
    return [frames[0], *(f if memoryview(f).nbytes < zmq.COPY_THRESHOLD else zmq.Frame(f, copy=False)
                         for f in frames[1:])]
