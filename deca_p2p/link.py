"""One outgoing link of a Transport: its emulated latency, bandwidth and jitter, its bounded queue, and the sender
thread that owns the link's DEALER socket (deca_p2p/transport.py has the rest: the ROUTER, the hello barrier;
curve.py security). On an emulated link a message is handed to ZeroMQ, whole, when its emulated transmission starts, stamped
with the time the link would deliver it, and the receiver holds it until then (delay_line.py says why);
``LinkCounters`` counts what went out."""

from __future__ import annotations

import math
import os
import random
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from .delay_line import stamp_frame
from .transport_base import RECONNECT_IVL_MAX_MS, RECONNECT_IVL_MS, SNDHWM, _POLL_SLICE_S, TransportError

if TYPE_CHECKING:
    from .transport import Transport


@dataclass(frozen=True)
class LinkSpec:
    """Emulated properties of one outgoing link (``bandwidth_mbps=None``: unlimited)."""

    latency_ms: float = 0.0
    bandwidth_mbps: float | None = None
    jitter_ms: float = 0.0


@dataclass
class LinkCounters:
    """Traffic on one link.  ``sent_*`` count messages handed to ZeroMQ; ``recv_*`` received ones."""

    sent_header: int = 0
    sent_payload: int = 0
    recv_header: int = 0
    recv_payload: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0
    send_failures: int = 0
    data_sent: int = 0              # caller's messages handed to ZeroMQ ...
    handoff_late_s: float = 0.0     # ... and how long after their emulated start, summed (emulator accuracy)
    handoff_late_max_s: float = 0.0


def _link_params(spec: Any) -> tuple[float, float | None, float]:
    """(latency s, rate bytes/s or None, jitter s) from any object with LinkSpec's attributes."""
    if spec is None:
        return 0.0, None, 0.0
    try:
        lat = float(getattr(spec, "latency_ms", 0.0) or 0.0)
        bw = getattr(spec, "bandwidth_mbps", None)
        bw = None if bw is None else float(bw)
        jit = float(getattr(spec, "jitter_ms", 0.0) or 0.0)
    except (TypeError, ValueError) as e:
        raise TransportError(f"invalid link spec {spec!r}: {e}") from None
    if not (math.isfinite(lat) and lat >= 0):
        raise TransportError(f"invalid link spec {spec!r}: latency_ms must be >= 0")
    if not (math.isfinite(jit) and jit >= 0):
        raise TransportError(f"invalid link spec {spec!r}: jitter_ms must be >= 0")
    if bw is not None and not (bw > 0):  # inf is allowed and means unlimited
        raise TransportError(f"invalid link spec {spec!r}: bandwidth_mbps must be > 0 or null")
    rate = None if bw is None or math.isinf(bw) else bw * 1e6 / 8.0
    return lat / 1e3, rate, jit / 1e3


def _as_buffer(frame: Any) -> Any:
    """Return an object exposing a C-contiguous buffer for ``frame`` (kept alive until sent)."""
    if isinstance(frame, (bytes, zmq.Frame)):
        return frame
    try:
        mv = memoryview(frame)
    except TypeError:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(frame, torch.Tensor):
            t = frame.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()  # a transposed tensor would otherwise go out in memory order
            return t.reshape(-1).view(torch.uint8).numpy()
        raise TypeError(f"frame of type {type(frame).__name__} does not support the buffer protocol") from None
    if not mv.c_contiguous:
        raise ValueError("frame buffer is not C-contiguous (send a contiguous copy)")
    return frame


def _nbytes(buf: Any) -> int:
    if isinstance(buf, bytes):
        return len(buf)
    return memoryview(buf).nbytes


MAX_QUEUED_DATA = 64           # messages waiting on one link, at most ...
MAX_QUEUED_BYTES = 1 << 31     # ... and bytes (but always room for two)
# A timed wait on this machine returns 0.15-0.2 ms late when idle, more when the thread then waits for the GIL
# (measured: the hand-off was 0.43 ms late on average between two idle peers at 1 Gbit/s). So the sender thread
# wakes this much before a message is due and busy-waits (yielding the CPU and the GIL on every turn) until it is:
# ~0.3 ms of a core per emulated message, none on links without emulation (they take the caller's fast path).
WAKE_EARLY_S = 0.5e-3


class _Item:
    __slots__ = ("frames", "header", "payload", "send_at", "timeout", "data", "hello_inc")

    def __init__(self, frames, header, payload, send_at, timeout, data, hello_inc):
        self.frames = frames
        self.header = header
        self.payload = payload
        self.send_at = send_at          # when the emulated link starts transmitting it (monotonic clock)
        self.timeout = timeout          # seconds to keep trying to hand it to zmq (0: one try)
        self.data = data                # True: caller's message (failures are counted)
        self.hello_inc = hello_inc      # not None: our hello with this incarnation


class _Link:
    """One outgoing link: emulation queue + the sender thread that owns the DEALER."""

    def __init__(self, tr: "Transport", dst: int, endpoint: str, spec: Any, rng: random.Random):
        self.tr = tr
        self.dst = dst
        self.endpoint = endpoint
        self.latency, self.rate, self.jitter = _link_params(spec)
        self.rng = rng
        # Two conditions on one lock: the sender thread waits on `cond` (something queued, or closing), wait_idle on
        # `idle` (nothing outstanding). Every send ends in _done; were they one condition, each would wake the idle
        # sender thread for nothing (~10 wake-ups a second per link in make cluster), and each wake-up preempts a step.
        lock = threading.RLock()
        self.cond = threading.Condition(lock)
        self.idle = threading.Condition(lock)
        self.queue: deque[_Item] = deque()
        self.free_at = 0.0
        self.last_deliver = 0.0
        self.outstanding = 0            # queued or being handed to zmq
        self.hellos_outstanding = 0
        self.hello_ok_inc: int | None = None   # incarnation of the last hello zmq accepted
        self.closing = False
        self.close_deadline = math.inf
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.sock: zmq.Socket | None = None
        # Who touches the DEALER: the sender thread, or (fast path) the caller. zmq sockets may change threads
        # behind a full memory barrier, which this lock gives; it is never held while waiting for anything else.
        self.sock_lock = threading.Lock()
        self.direct = self.latency == 0 and self.rate is None and self.jitter == 0  # nothing to emulate
        self.thread = threading.Thread(
            target=self._run, name=f"deca-link-{tr.my_id}->{dst}", daemon=True)

    # -- caller side -----------------------------------------------------------------------
    def enqueue(self, frames: list, header: int, payload: int, *, timeout: float, data: bool,
                hello_inc: int | None = None) -> None:
        with self.cond:
            if self.closing:  # raced with close(): the sender thread is gone or going
                if data:
                    self.tr._count_failures(self.dst, 1)
                return
            now = time.monotonic()
            send_at = now
            if not self.direct:  # the emulated link: it starts sending at send_at and delivers at `deliver`
                send_at = max(now, self.free_at)
                t_tx = send_at
                if self.rate is not None:
                    t_tx = send_at + (header + payload) / self.rate
                    self.free_at = t_tx
                deliver = t_tx + self.latency
                if self.jitter > 0:
                    deliver += self.rng.uniform(-self.jitter, self.jitter)
                deliver = max(deliver, t_tx, self.last_deliver)
                self.last_deliver = deliver
                # the receiver holds it till then (and never lets it overtake the messages before it)
                frames = [stamp_frame(time.time() + (deliver - now)), *frames]
            # Fast path: due to go out now and nothing ahead of it. The caller hands it to zmq itself: waking the
            # sender thread for it cost ~0.5 ms a message (GIL hand-off; benchmarks/wire_throughput.py).
            direct = send_at <= now and not self.outstanding and self.sock is not None
            if not direct and data:
                self._bound_queue_locked()
            item = _Item(frames, header, payload, send_at, timeout, data, hello_inc)
            self.outstanding += 1
            if hello_inc is not None:
                self.hellos_outstanding += 1
            if not direct:
                self.queue.append(item)
                self.cond.notify_all()
                return
        self._send_now(item)

    def _send_now(self, item: _Item) -> None:
        """One try to hand an item to zmq from the caller's thread; if zmq cannot take it now (pipe full, not yet
        connected), the sender thread takes over with the item's whole timeout."""
        with self.sock_lock:
            sock = self.sock
            try:
                if sock is None:
                    raise zmq.Again
                sock.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
                ok = True
            except zmq.Again:
                ok = None
            except zmq.ZMQError:
                ok = False
        if ok is None:
            with self.cond:
                self.queue.appendleft(item)  # first in line: nothing else was outstanding
                if self.sock is None and self.closing:  # the sender thread closed the link meanwhile
                    self._drop_all_locked()
                else:
                    self.cond.notify_all()
            return
        self._done(item, ok)

    # -- sender thread ---------------------------------------------------------------------
    def _make_socket(self) -> zmq.Socket:
        tr = self.tr
        sock = tr.ctx.socket(zmq.DEALER)
        try:
            rid = f"peer-{tr.my_id}" if tr.curve is None else f"peer-{tr.my_id}/{secrets.token_hex(8)}"
            sock.setsockopt(zmq.ROUTING_ID, rid.encode())
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDTIMEO, max(0, int(tr.send_timeout_s * 1000)))
            sock.setsockopt(zmq.LINGER, tr.linger_ms)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            tr._set_heartbeat(sock)
            if tr.curve is not None:
                sock.setsockopt(zmq.CURVE_PUBLICKEY, tr.curve.public_key)
                sock.setsockopt(zmq.CURVE_SECRETKEY, tr.curve.secret_key)
                sock.setsockopt(zmq.CURVE_SERVERKEY, tr.curve.peer_keys[self.dst])
            if self.endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _run(self) -> None:
        try:
            sock = self._make_socket()
        except BaseException as e:  # reported by Transport.start()
            self.error = e
            self.ready.set()
            return
        with self.sock_lock:
            self.sock = sock
        self.ready.set()
        try:
            while True:
                item = self._next_item()
                if item is None:
                    break
                ok = False
                try:
                    ok = self._transmit(sock, item)
                except Exception:  # never let a send error kill the thread
                    ok = False
                self._done(item, ok)
                item = None  # drop our reference to the frames
        finally:
            with self.cond:
                left = self.close_deadline - time.monotonic() if self.closing else math.inf
            linger = self.tr.linger_ms if math.isinf(left) else int(max(0.0, min(left * 1e3, self.tr.linger_ms)))
            with self.sock_lock:  # no caller is mid-send on it
                self.sock = None
                try:
                    sock.close(linger=linger)
                except Exception:
                    pass

    def _next_item(self) -> _Item | None:
        """Wait until the head of the queue is due; None when the link is closing and done."""
        with self.cond:
            while True:
                if self.queue:
                    head = self.queue[0]
                    if self.closing and head.send_at > self.close_deadline:
                        self._drop_all_locked()
                        return None
                    due = head.send_at
                    wait = due - time.monotonic()
                    if wait <= 0:
                        return self.queue.popleft()
                    if wait > WAKE_EARLY_S:
                        self.cond.wait(wait - WAKE_EARLY_S)
                        continue
                    self.cond.release()  # the last stretch: yield until due, then look at the queue again
                    try:
                        while time.monotonic() < due:
                            os.sched_yield()
                    finally:
                        self.cond.acquire()
                elif self.closing:
                    return None
                else:
                    self.cond.wait()

    def _bound_queue_locked(self) -> None:
        """Keep at most MAX_QUEUED_DATA messages waiting on a link: a dead or stalled neighbour must not make the
        queue (block-sized messages) grow without bound. The oldest goes; the receiver repairs the gap (resync)."""
        data_items = [it for it in self.queue if it.data]
        queued = sum(it.header + it.payload for it in data_items)
        while len(data_items) >= 2 and (len(data_items) >= MAX_QUEUED_DATA or queued >= MAX_QUEUED_BYTES):
            oldest = data_items.pop(0)
            queued -= oldest.header + oldest.payload
            self.queue.remove(oldest)
            self.outstanding -= 1
            self.tr._count_failures(self.dst, 1)

    def _drop_all_locked(self) -> None:
        failures = sum(1 for it in self.queue if it.data)
        hellos = sum(1 for it in self.queue if it.hello_inc is not None)
        self.outstanding -= len(self.queue)
        self.hellos_outstanding -= hellos
        self.queue.clear()
        if failures:
            self.tr._count_failures(self.dst, failures)
        self.cond.notify_all()
        self.idle.notify_all()

    def _transmit(self, sock: zmq.Socket, item: _Item) -> bool:
        """Hand one message to zmq, retrying while the pipe is full or not connected."""
        give_up = time.monotonic() + item.timeout
        while True:
            with self.sock_lock:
                try:
                    sock.send_multipart(item.frames, flags=zmq.NOBLOCK, copy=False)
                    return True
                except zmq.Again:
                    pass
                except zmq.ZMQError:
                    return False
            left = min(give_up, self.close_deadline) - time.monotonic()
            if left <= 0:
                return False
            with self.sock_lock:  # (polling only: the caller's fast path is off while this item is outstanding)
                sock.poll(max(1, int(min(left, _POLL_SLICE_S) * 1e3)), zmq.POLLOUT)

    def _done(self, item: _Item, ok: bool) -> None:
        if ok:
            self.tr._count_sent(self.dst, item.header, item.payload,
                                time.monotonic() - item.send_at if item.data else None)
        elif item.data:
            self.tr._count_failures(self.dst, 1)
        with self.cond:
            self.outstanding -= 1
            if item.hello_inc is not None:
                self.hellos_outstanding -= 1
                if ok:
                    self.hello_ok_inc = item.hello_inc
            self.idle.notify_all()

    def begin_close(self, deadline: float) -> None:
        with self.cond:
            self.closing = True
            self.close_deadline = deadline
            self.cond.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self.cond:
            while self.outstanding > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.idle.wait(left)
            return True


