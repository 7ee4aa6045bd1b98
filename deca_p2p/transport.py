"""ZeroMQ transport: sockets, per-link emulation, byte counters.  No model knowledge.

Layout (DESIGN.md §6, zguide ch. 8 "Harmony"): every peer binds one ROUTER at its own endpoint
and connects one DEALER per neighbour (routing id ``peer-<my_id>``) to that neighbour's ROUTER.
A peer therefore *sends* on its DEALERs and *receives* on its ROUTER; the first frame the ROUTER
yields is the sender's routing id.

Threads.  ZeroMQ sockets are not thread-safe, so:

* the ROUTER is created, used and closed by the caller's thread only (``start``/``recv``/
  ``barrier``/``close``);
* each outgoing link has its own sender thread which creates, uses and closes that link's DEALER.
  ``send`` only appends to the link's queue, so it never blocks the caller.

Link emulation.  The kernel has no netem, so each link models a pipe of rate R (bytes/s) and
one-way latency L exactly: a message of S bytes (all frames) starts transmission at
``t_0 = max(now, link_free_at)``, finishes at ``t_tx = t_0 + S/R`` (``link_free_at = t_tx``) and is due at
``t_tx + L + jitter``, jitter ~ U[-J, J] from a seeded RNG, clamped so that delivery order is
preserved (TCP does not reorder) and no message is delivered before it was transmitted.  The sender hands it to
ZeroMQ at ``t_0`` with a stamp frame naming its due time; the receiver's delay line (delay_line.py) holds it until
then, so the hosts' own copying overlaps the emulated transmission (PROTOCOL.md §4.5).

Failures.  A send that cannot be handed to ZeroMQ within ``send_timeout_s`` (peer down:
``IMMEDIATE=1`` refuses to queue; or its high-water mark stays full) is dropped and counted in
``LinkCounters.send_failures``; nothing is raised into the caller and no thread dies.

Security (``curve=CurveConfig(...)``, DESIGN.md §6).  The ROUTER is a CURVE server and every DEALER a
CURVE client (its own keypair, the neighbour's public key as server key), so links are encrypted and
authenticated.  A ZAP handler (``zmq.auth.thread.ThreadAuthenticator``, started before the ROUTER binds,
stopped after it closes) accepts a client only if its public key is in ``CurveConfig.peer_keys`` (the
bootstrap file's keys; never CURVE_ALLOW_ANY).  ZAP gives each accepted connection the User-Id = the
client's z85 public key, and libzmq stamps it on every message from that connection: ``recv`` maps it
back to the peer id owning the key and returns that as ``src``.  The routing id a sender chose is not
authenticated and is ignored: a message whose routing id names another peer (``peer-1`` sent with peer
2's key) is still returned as peer 2's (so gossip drops it as ``spoofed_src`` when its header claims 1)
and counted in ``spoofed_routing_ids``; a message without a known User-Id (cannot happen while the ZAP
handler runs) is returned with ``src=None`` and counted in ``unknown_msgs_recv``.  In secure mode a DEALER's
routing id is ``peer-<id>/<16 random hex digits>`` (new for every socket), not ``peer-<id>``: with
ROUTER_HANDOVER a connection that presents a routing id already in use takes it over and the older
connection is cut (measured: the real peer's messages were silently lost for ~4 s, until the heartbeat
timeout made it reconnect), so a guessable routing id would let any key holder cut another peer's link
at will.  A secure Transport needs a zmq context of its own (there is one ZAP handler per context).
Refused connections never reach ``recv``: a socket monitor on the ROUTER counts every failed incoming handshake
(an outsider's key refused by ZAP, a key that does not match its secret, a client without CURVE) in
``rejected_handshakes`` (by kind in ``handshake_failures``) and says the first one through ``log``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Callable, Mapping, Sequence

import zmq

# the outgoing links (emulation, queue, sender thread) live in link.py; what both use, in transport_base.py;
# the hello handshake and barrier in transport_hello.py; endpoint and routing-id parsing in transport_addr.py;
# the counters' methods in transport_counters.py
from .curve import ZAP_DOMAIN, CurveConfig, Gatekeeper
from .delay_line import DelayLine, split_stamp
from .link import (LinkCounters, LinkSpec, MAX_QUEUED_BYTES, MAX_QUEUED_DATA, _as_buffer, _Item,  # noqa: F401
                   _Link, _link_params, _nbytes)
from .transport_addr import _ROUTING_ID_RE, _TCP_RE, _bind_address, _parse_src  # noqa: F401
from .transport_base import (HELLO_INTERVAL_S, RCVHWM, RECONNECT_IVL_MAX_MS, RECONNECT_IVL_MS,  # noqa: F401
                             SNDHWM, TRIM_AFTER_UNWANTED_BYTES, TransportError, _POLL_SLICE_S, _wire,
                             _zmq_reason)
from .transport_counters import TransportCounters
from .transport_hello import MAX_PENDING_DURING_BARRIER, REANSWER_S, HelloBarrier  # noqa: F401
from .heap import malloc_trim

__all__ = ["TransportError", "LinkSpec", "LinkCounters", "CurveConfig", "Transport"]  # CurveConfig: curve.py

CURVE_SLOWEST_RATE = 20e6       # bytes/s: heartbeat timeouts allow a largest message moving this slowly under CURVE
PLAIN_SLOWEST_RATE = 100e6      # bytes/s: the same allowance without CURVE

MAX_DRAIN_AT_DEADLINE = 64      # recv at its deadline reads on while the delay line takes what it reads (held ones)


class Transport(HelloBarrier, TransportCounters):
    """One peer's sockets: a bound ROUTER for input, one emulated DEALER link per neighbour.

    ``send`` may be called from any thread; ``start``, ``recv``, ``barrier`` and ``close`` must be
    called from one thread (the one that owns the ROUTER).
    """

    def __init__(self, my_id: int, endpoints: dict[int, str], neighbours: Sequence[int],
                 links: dict[int, LinkSpec] | None = None, *,
                 max_message_bytes: int = 1 << 31, send_timeout_s: float = 10.0,
                 linger_ms: int = 1000, heartbeat_s: float = 1.0,
                 ctx: zmq.Context | None = None, seed: int = 0, curve: CurveConfig | None = None,
                 hello_cfg: Mapping[str, str] | None = None, log: Callable[[str], None] | None = None):
        self.my_id = int(my_id)
        eps = {int(k): str(v) for k, v in endpoints.items()}
        if self.my_id not in eps:
            raise TransportError(f"no endpoint for peer {self.my_id} (this peer)")
        nbrs: list[int] = []
        for n in neighbours:
            n = int(n)
            if n == self.my_id:
                raise TransportError(f"peer {self.my_id} lists itself as a neighbour")
            if n in nbrs:
                raise TransportError(f"neighbour {n} listed twice")
            if n not in eps:
                raise TransportError(f"no endpoint for neighbour {n}")
            nbrs.append(n)
        if send_timeout_s < 0 or linger_ms < 0 or max_message_bytes <= 0:
            raise TransportError("send_timeout_s, linger_ms must be >= 0 and max_message_bytes > 0")
        links = {int(k): v for k, v in (links or {}).items()}
        if curve is not None:
            if not isinstance(curve, CurveConfig):
                raise TransportError("curve must be a CurveConfig")
            if not zmq.has("curve"):
                raise TransportError("this libzmq was built without CURVE support")
            if curve.peer_keys.get(self.my_id) != curve.public_key:
                raise TransportError(f"the allowed keys do not list this peer's ({self.my_id}) public key")
            no_key = [n for n in nbrs if n not in curve.peer_keys]
            if no_key:
                raise TransportError(f"no public key for neighbour {no_key[0]}")
        self.curve: CurveConfig | None = curve
        self._key_owner: dict[bytes, int] = curve.owner() if curve is not None else {}
        self.log = log                  # one-line notes for the console (the first refused handshake)
        self.endpoints = eps
        self.endpoint = eps[self.my_id]
        self.neighbours: tuple[int, ...] = tuple(nbrs)
        self.max_message_bytes = int(max_message_bytes)
        self.send_timeout_s = float(send_timeout_s)
        self.linger_ms = int(linger_ms)
        self.heartbeat_s = float(heartbeat_s)
        self.seed = seed
        self._own_ctx = ctx is None
        self.ctx: zmq.Context = zmq.Context() if ctx is None else ctx
        # secure: the ZAP handler, and the count of refused handshakes (curve.py)
        self._gate = None if curve is None else Gatekeeper(self.ctx, curve, self.my_id, self.endpoint, self._note)
        self._links: dict[int, _Link] = {
            n: _Link(self, n, eps[n], links.get(n), random.Random(f"deca-link/{seed}/{self.my_id}/{n}"))
            for n in nbrs
        }
        self._ctr_lock = threading.Lock()
        self._counters: dict[int, LinkCounters] = {n: LinkCounters() for n in nbrs}
        self.unknown_msgs_recv = 0      # messages whose routing id (secure: User-Id key) names no peer in endpoints
        self.spoofed_routing_ids = 0    # secure: messages whose routing id names another peer than their key
        self._unwanted_bytes = 0        # received from non-neighbours since the last malloc_trim (_recv_raw)
        self._router: zmq.Socket | None = None
        self.bound_endpoint: str | None = None
        self._pending: deque[tuple[int | None, list]] = deque()
        self._delay = DelayLine()       # neighbours' messages from emulated links, until their due time (monotonic)
        self.bad_stamps = 0             # stamp frames without a finite time (delay_line.py)
        self._answered: dict[tuple[int, int], float] = {}  # (neighbour, inc) -> when we last answered its hello
        self._inc = 0
        self._hello_frames: list | None = None
        # configuration handshake (fingerprint.py): our fingerprint, sent in every hello of ours; the one each
        # neighbour sent; and the (neighbour, incarnation) pairs whose hello was refused mid-run (a restarted peer
        # with another configuration: it fails its own barrier, and gossip drops what that incarnation sends)
        self.hello_cfg: dict[str, str] | None = None if hello_cfg is None else dict(hello_cfg)
        self.neighbour_cfg: dict[int, dict[str, str]] = {}
        self.cfg_rejected: dict[tuple[int, int], str] = {}
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def _set_heartbeat(self, sock: zmq.Socket) -> None:
        ivl = int(self.heartbeat_s * 1000)
        if ivl > 0:
            # libzmq only counts whole messages as signs of life (and CURVE encrypts / decrypts a message in one
            # piece): a big block in transit must not look like a dead peer. Measured: a 768 MB block never got
            # through with a 3 s timeout on a busy 2-core machine, with or without CURVE.
            rate = CURVE_SLOWEST_RATE if self.curve is not None else PLAIN_SLOWEST_RATE
            timeout = 3 * ivl + int(1000 * self.max_message_bytes / rate)
            timeout = min(timeout, 6_553_500)
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
            sock.setsockopt(zmq.HEARTBEAT_TTL, timeout)

    def start(self) -> None:
        """Bind the ROUTER and connect one DEALER per neighbour."""
        if self._closed:
            raise TransportError("transport is closed")
        if self._started:
            raise TransportError("transport already started")
        _wire()  # import now (it pulls in torch): close() and barrier() must not pay for it
        addr = _bind_address(self.endpoint)
        if self._gate is not None:
            self._gate.start_auth()  # before the ROUTER binds: without a ZAP handler libzmq accepts any client key
        router = self.ctx.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            router.setsockopt(zmq.RCVHWM, RCVHWM)
            router.setsockopt(zmq.LINGER, 0)
            self._set_heartbeat(router)
            if self.curve is not None:
                router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                router.setsockopt(zmq.CURVE_SERVER, 1)
                router.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret_key)
                self._gate.start_monitor(router)  # before bind: no refused handshake goes uncounted
            if addr.startswith("tcp://["):
                router.setsockopt(zmq.IPV6, 1)
            router.bind(addr)
        except zmq.ZMQError as e:
            self._shut(router)
            raise TransportError(f"cannot bind {self.endpoint}: {_zmq_reason(e)}") from None
        self._router = router
        try:
            self.bound_endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        except zmq.ZMQError:
            self.bound_endpoint = addr
        self._started = True
        for link in self._links.values():
            link.thread.start()
        errors = []
        for link in self._links.values():
            link.ready.wait()
            if link.error is not None:
                err = link.error
                reason = _zmq_reason(err) if isinstance(err, zmq.ZMQError) else str(err)
                errors.append(f"cannot connect to peer {link.dst} at {link.endpoint}: {reason}")
        if errors:
            self.close(send_bye=False)
            raise TransportError(errors[0])

    def _shut(self, router: zmq.Socket | None) -> None:
        """Close ROUTER (None: there is none) between its handshake monitor and the ZAP handler, in that order:
        the monitor stops on the socket it watches, and the ZAP handler outlives every socket that asks it."""
        if router is not None:
            if self._gate is not None:
                self._gate.stop_monitor(router)
            router.close(linger=0)
        if self._gate is not None:
            self._gate.stop_auth()

    def _note(self, line: str) -> None:
        if self.log is not None:  # read at each note: a caller may set `log` after construction
            self.log(line)

    def close(self, send_bye: bool = True) -> None:
        """Send bye to neighbours (best effort), stop the link threads, close sockets (bounded)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            if send_bye:
                try:
                    w = _wire()
                    bye = w.encode(w.Message("bye", src=self.my_id, inc=self._inc))
                    hdr, pay = self._sizes(bye)
                    for link in self._links.values():
                        if link.thread.is_alive():
                            link.enqueue(bye, hdr, pay, timeout=self.linger_ms / 1e3, data=False)
                except Exception:
                    pass
            deadline = time.monotonic() + self.linger_ms / 1e3
            for link in self._links.values():
                link.begin_close(deadline)
            stuck = False
            for link in self._links.values():
                if link.thread.ident is not None:
                    link.thread.join(max(0.0, deadline - time.monotonic()) + 2.0)
                    stuck |= link.thread.is_alive()
            router, self._router = self._router, None
            self._shut(router)
            if stuck:  # cannot happen unless zmq hangs; never block forever in term()
                return
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "Transport":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def emulates(self) -> bool:
        """Whether any of this peer's outgoing links emulates latency, bandwidth or jitter (link.py). The topology
        gives its neighbours the same links, so its incoming ones do too."""
        return any(not link.direct for link in self._links.values())

    def _check_open(self) -> None:
        if not self._started:
            raise TransportError("transport not started")
        if self._closed:
            raise TransportError("transport is closed")

    # -- sending ---------------------------------------------------------------------------
    @staticmethod
    def _sizes(frames: list) -> tuple[int, int]:
        return _nbytes(frames[0]), sum(_nbytes(f) for f in frames[1:])

    def send(self, dst: int, frames: list) -> None:
        """Queue ``frames`` for ``dst``; returns at once.  Frame 0 is the header.

        Payload frames are sent zero-copy: they stay referenced until zmq is done with them, and
        the caller must not mutate them after this call.
        """
        self._check_open()
        link = self._links.get(dst)
        if link is None:
            raise TransportError(f"peer {dst} is not a neighbour of peer {self.my_id}")
        if not frames:
            raise ValueError("a message needs at least one frame (the header)")
        bufs = [_as_buffer(f) for f in frames]
        hdr, pay = self._sizes(bufs)
        link.enqueue(bufs, hdr, pay, timeout=self.send_timeout_s, data=True)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued outgoing message has been handed to zmq (or dropped)."""
        if not self._started:
            return True
        deadline = time.monotonic() + max(0.0, timeout_s)
        return all(link.wait_idle(deadline) for link in self._links.values())

    # -- receiving -------------------------------------------------------------------------
    def _recv_raw(self, timeout_s: float | None) -> tuple[int | None, list] | None:
        """The next message whose time has come: one the delay line held (an emulated link's, delay_line.py) or
        one read now. None after ``timeout_s`` (None: wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        while True:
            now = time.monotonic()
            r = self._delay.pop_due(now)
            if r is not None:
                return r
            if deadline is not None and now >= deadline:
                # what zmq already has may be due now, queued behind a message the delay line just took
                for _ in range(MAX_DRAIN_AT_DEADLINE):
                    read, r = self._read(0.0)
                    if r is not None:
                        return r
                    if not read:
                        break
                return self._delay.pop_due(time.monotonic())
            wait = None if deadline is None else deadline - now
            nxt = self._delay.next_due()
            if nxt is not None:
                wait = nxt - now if wait is None else min(wait, nxt - now)
            _, r = self._read(wait)
            if r is not None:
                return r

    def _read(self, wait_s: float | None) -> tuple[bool, tuple[int | None, list] | None]:
        """(whether a message was read within ``wait_s``, it, or None when the delay line took it)."""
        router = self._router
        assert router is not None
        if wait_s is not None and wait_s < 1e-3:  # zmq polls in whole ms: look every 0.1 ms for the last stretch
            end = time.monotonic() + wait_s
            while not router.poll(0, zmq.POLLIN):
                left = end - time.monotonic()
                if left <= 0:
                    return False, None
                time.sleep(min(left, 1e-4))
        elif not router.poll(None if wait_s is None else int(wait_s * 1e3), zmq.POLLIN):
            return False, None
        try:
            parts = router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False, None
        due, stamped, frames = split_stamp(parts[1:])
        if stamped and due is None:
            self.bad_stamps += 1  # a stamp whose time is no number: ignored, the message goes on at once
        src = _parse_src(parts[0].bytes) if self.curve is None else self._authenticated_src(parts)
        hdr = len(frames[0]) if frames else 0
        nbytes = sum(len(f) for f in frames)
        if src not in self._links:  # gossip drops it unread: hand the freed frames' pages back now and then
            self._unwanted_bytes += nbytes  # (TRIM_AFTER_UNWANTED_BYTES says why)
            if self._unwanted_bytes >= TRIM_AFTER_UNWANTED_BYTES:
                self._unwanted_bytes = 0
                malloc_trim()
        if src is None or src not in self.endpoints:  # no counters per made-up peer-<n>: they would grow unbounded
            with self._ctr_lock:
                self.unknown_msgs_recv += 1
        else:
            with self._ctr_lock:
                c = self._counters.get(src)
                if c is None:
                    c = self._counters[src] = LinkCounters()
                c.recv_header += hdr
                c.recv_payload += nbytes - hdr
                c.msgs_recv += 1
        if src in self._links:  # (only a neighbour's: anything else is dropped unread, so holding it would only cost
            # memory) its stamp in this process's monotonic clock, so that a later step of the wall clock changes nothing
            now = time.monotonic()
            due_mono = None if due is None else now + (due - time.time())
            if self._delay.hold(src, (src, frames), nbytes, due_mono, now):
                return True, None
        return True, (src, frames)

    def _authenticated_src(self, parts: list) -> int | None:
        """Secure mode: the peer owning the CURVE key the message came with (ZAP's User-Id), or None."""
        try:
            user_id = parts[-1].get("User-Id")
        except (zmq.ZMQError, AttributeError):
            return None
        if isinstance(user_id, str):
            user_id = user_id.encode("ascii", "replace")
        src = self._key_owner.get(user_id)
        if src is not None:
            claim = _parse_src(parts[0].bytes.split(b"/", 1)[0])
            if claim is not None and claim != src:
                with self._ctr_lock:
                    self.spoofed_routing_ids += 1
        return src

    def recv(self, timeout_s: float | None) -> tuple[int | None, list] | None:
        """Next message: ``(src, frames)`` (src None when the routing id is not ``peer-<n>``).

        With CURVE on, ``src`` is the peer owning the key the message was authenticated with, whatever
        its routing id says (see the module docstring).

        Frames are ``zmq.Frame`` objects received zero-copy (``frame.buffer`` is a memoryview).
        Returns None after ``timeout_s`` (None: wait forever) without a message.  A hello from a
        neighbour is answered once per (peer, incarnation) with our own hello, and returned too.
        """
        self._check_open()
        if self._pending:
            return self._pending.popleft()
        r = self._recv_raw(timeout_s)
        if r is not None and r[0] in self._links and len(r[1]) == 1:
            self._maybe_answer_hello(r[0], r[1])
        return r
