"""What a Transport counts, and how callers read it: the sender threads (link.py) add what they hand to ZeroMQ, or
drop, to each link's ``LinkCounters`` and ``counters`` snapshots them under the same lock; ``held_stamps`` says what
the delay line defused; in secure mode, the refused handshakes (counted in curve.py). `TransportCounters` is a mixin
of ``Transport`` (transport.py), whose ``__init__`` makes the counters and whose ``_read`` counts what arrives."""

from __future__ import annotations

import copy

from .link import LinkCounters


class TransportCounters:
    """Transport's counting methods; ``_count_*`` are called by the sender threads, the rest by any thread."""

    def _count_sent(self, dst: int, header: int, payload: int, late_s: float | None = None) -> None:
        with self._ctr_lock:
            c = self._counters[dst]
            c.sent_header += header
            c.sent_payload += payload
            c.msgs_sent += 1
            if late_s is not None:
                c.data_sent += 1
                c.handoff_late_s += late_s
                c.handoff_late_max_s = max(c.handoff_late_max_s, late_s)

    def _count_failures(self, dst: int, k: int) -> None:
        with self._ctr_lock:
            self._counters[dst].send_failures += k

    def held_stamps(self) -> dict[str, int]:
        """What the delay line defused (delay_line.py): stamps clamped, holds cut short, stamps unreadable."""
        return {"stamps_clamped": self._delay.clamped, "holds_cut_short": self._delay.cut_short,
                "bad_stamps": self.bad_stamps}

    def counters(self) -> dict[int, LinkCounters]:
        """Snapshot of the per-link counters (neighbours, plus any other peer in ``endpoints`` heard from)."""
        with self._ctr_lock:
            return {k: copy.copy(v) for k, v in self._counters.items()}

    @property
    def rejected_keys(self) -> int:
        """Secure: CURVE handshakes the ZAP handler refused (client key not allowed)."""
        return self._gate.rejected_keys if self._gate is not None else 0

    @property
    def rejected_handshakes(self) -> int:
        """Secure: failed incoming handshakes, counted by a monitor thread on the ROUTER (curve.py)."""
        return self._gate.rejected_handshakes if self._gate is not None else 0

    @property
    def handshake_failures(self) -> dict[str, int]:
        """Secure: the failed incoming handshakes by kind (auth, protocol, no_detail)."""
        return self._gate.handshake_failures if self._gate is not None else {}
