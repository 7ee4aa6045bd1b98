"""The hello handshake of a Transport: our hello, answering a neighbour's, comparing configuration fingerprints,
and the start-up barrier (PROTOCOL.md §10.1). `HelloBarrier` is a mixin: it uses the sockets, links and state that
``Transport`` (transport.py) owns, and ``Transport.recv`` hands it the hellos that arrive after the barrier.
"""

from __future__ import annotations

import time

from .transport_base import HELLO_INTERVAL_S, TransportError, _POLL_SLICE_S, _wire

REANSWER_S = 1.0                # a repeated hello of the same (neighbour, inc) is answered again at most this often
MAX_PENDING_DURING_BARRIER = 64  # messages kept for recv() while the hello barrier runs


class HelloBarrier:
    """Transport's hello methods; ``barrier`` and the answering of hellos run on the thread that owns the ROUTER."""

    def _send_hello(self, dst: int, *, timeout: float) -> None:
        assert self._hello_frames is not None
        hdr, pay = self._sizes(self._hello_frames)
        self._links[dst].enqueue(self._hello_frames, hdr, pay, timeout=timeout, data=False,
                                 hello_inc=self._inc)

    def _hello(self) -> list:
        if self._hello_frames is None:
            w = _wire()
            self._hello_frames = w.encode(w.Message("hello", src=self.my_id, inc=self._inc, cfg=self.hello_cfg))
        return self._hello_frames

    def _maybe_answer_hello(self, src: int, frames: list) -> None:
        w = _wire()
        try:
            msg = w.decode(frames)
        except w.WireError:
            return
        if msg.kind == "hello" and msg.src == src:
            self._answer(src, msg.inc)  # always: a restarted neighbour with another configuration learns it from ours
            if msg.cfg is not None:
                diff = self._cfg_difference(src, msg.cfg)
                if diff is not None:
                    self.cfg_rejected[(src, msg.inc)] = diff

    def _cfg_difference(self, src: int, cfg: dict) -> str | None:
        """Compare a neighbour's fingerprint with ours: None when they agree (or we have none), else one line."""
        if self.hello_cfg is None:
            return None
        from .fingerprint import describe, first_difference

        diff = first_difference(self.hello_cfg, cfg)
        if diff is None:
            self.neighbour_cfg[src] = dict(cfg)
            return None
        return f"configuration differs from neighbour {src} in {describe(*diff)}"

    def _answer(self, src: int, inc: int) -> None:
        """Answer a neighbour's hello: the first one at once, a repeated one again at most every REANSWER_S.
        An answer can be lost (our DEALER not yet connected within the send timeout on a slow start), and a
        neighbour still in its barrier repeats its hello until it hears ours: answering only the first left it
        waiting for its whole hello timeout. (The conformance peer's intermittent barrier timeout in CI turned out
        to be its own: its barrier re-read kept messages instead of its socket; tests/conformance_peer.py.)"""
        key, now = (src, inc), time.monotonic()
        last = self._answered.get(key)
        if last is None or now - last >= REANSWER_S:
            self._answered[key] = now
            self._hello()
            self._send_hello(src, timeout=self.send_timeout_s)

    def _keep(self, r: tuple[int | None, list]) -> None:
        """Hold a message that arrived during the barrier for recv(); a bounded number (the oldest go)."""
        self._pending.append(r)
        while len(self._pending) > MAX_PENDING_DURING_BARRIER:
            self._pending.popleft()

    def barrier(self, inc: int, timeout_s: float) -> None:
        """Start-up hello barrier with every neighbour.

        Returns once, for every neighbour, (a) a hello or any decodable message from it has been
        received and (b) one of our hellos has been accepted by zmq on the link to it (with
        ``IMMEDIATE=1`` that means the neighbour's ROUTER is up, so it will read our hello).
        Hellos are re-sent every ``HELLO_INTERVAL_S`` to neighbours not yet done, and each
        received hello is answered once.  Non-hello messages and position hellos (``stats.seq``)
        received meanwhile are kept for ``recv``.  Raises TransportError naming the missing peers
        after ``timeout_s``.

        With a configuration fingerprint (``hello_cfg``), (a) needs a hello carrying the neighbour's
        fingerprint (other messages are kept, but do not count), and a fingerprint that differs from ours
        in a field that must agree raises TransportError at once, naming the neighbour and the first such
        field; our answer to its hello is queued first, so the neighbour fails the same way.  So does a
        message of another protocol version from a neighbour.
        """
        self._check_open()
        w = _wire()
        if self._hello_frames is None or inc != self._inc:
            self._inc = int(inc)
            self._hello_frames = None
        self._hello()
        start = time.monotonic()
        deadline = start + timeout_s
        heard: set[int] = set()
        next_tx = start
        while True:
            missing = [n for n in self.neighbours
                       if n not in heard or self._links[n].hello_ok_inc != self._inc]
            if not missing:
                return
            now = time.monotonic()
            if now >= deadline:
                unheard = [n for n in missing if n not in heard] or missing
                noun = "peer" if len(unheard) == 1 else "peers"
                raise TransportError(f"hello barrier timed out after {timeout_s:g} s: no answer from "
                                     f"{noun} {', '.join(str(n) for n in unheard)}")
            if now >= next_tx:
                for n in missing:
                    link = self._links[n]
                    if link.hellos_outstanding == 0:
                        self._send_hello(n, timeout=0.0)
                next_tx = now + HELLO_INTERVAL_S
            r = self._recv_raw(max(0.0, min(_POLL_SLICE_S, next_tx - now, deadline - now)))
            if r is None:
                continue
            src, frames = r
            if src not in self._links:
                continue  # not a neighbour: nothing to keep (and a flood of them must not fill memory)
            try:
                msg = w.decode(frames)
            except w.WireError as e:
                if e.reason == "version" and self.hello_cfg is not None:
                    # a neighbour of another protocol version would only time out here: say so at once
                    raise TransportError(f"neighbour {src} speaks another protocol version ({e.message})") from None
                self._keep(r)  # the caller counts it as a bad message
                continue
            if msg.src == src:
                if msg.kind == "hello":
                    self._answer(src, msg.inc)
                    if self.hello_cfg is None:
                        heard.add(src)
                    elif msg.cfg is not None:  # a hello without one does not count
                        diff = self._cfg_difference(src, msg.cfg)
                        if diff is not None:
                            raise TransportError(diff)
                        heard.add(src)
                    if "seq" in msg.stats:  # a position hello (a neighbour telling a restarted peer where the
                        self._keep(r)       # network is): the rejoin (gossip.catch_up) needs it after the barrier
                    continue
                if self.hello_cfg is None:
                    heard.add(src)
            if msg.kind != "hello":
                self._keep(r)
