"""CURVE security of a Transport (DESIGN.md §6; transport.py says how its sockets use it): a peer's keys
(``CurveConfig``), the ZAP handler that admits only the bootstrap file's keys, and a monitor that counts every
refused incoming handshake (``Gatekeeper``). No sockets of its own but the monitor's inproc PAIR.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import zmq

from .transport_base import TransportError, _zmq_reason

__all__ = ["CurveConfig", "Gatekeeper", "ZAP_DOMAIN"]

ZAP_DOMAIN = "deca-p2p"


@dataclass(frozen=True)
class CurveConfig:
    """CURVE keys of one peer: its own keypair and every allowed peer's public key (all z85, 40 bytes).

    ``peer_keys`` ({peer id: public key}) is the allow-list and the key -> peer id map; it must hold this
    peer's and every neighbour's key.  The secret key is left out of ``repr`` so it cannot reach a log.
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)
    peer_keys: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def z85key(k: Any, what: str) -> bytes:
            if isinstance(k, str):
                k = k.encode("ascii", "replace")
            if not isinstance(k, bytes) or len(k) != 40:
                raise TransportError(f"{what} is not a 40-character z85 CURVE key")
            return k

        object.__setattr__(self, "public_key", z85key(self.public_key, "public_key"))
        object.__setattr__(self, "secret_key", z85key(self.secret_key, "secret_key"))
        keys = {int(i): z85key(k, f"public key of peer {i}") for i, k in self.peer_keys.items()}
        owners: dict[bytes, int] = {}
        for i, k in sorted(keys.items()):
            if k in owners:
                raise TransportError(f"peers {owners[k]} and {i} have the same public key")
            owners[k] = i
        object.__setattr__(self, "peer_keys", keys)
        try:
            derived = zmq.curve_public(self.secret_key)
        except (zmq.ZMQError, ValueError):
            raise TransportError("secret_key is not a valid CURVE key") from None
        if derived != self.public_key:
            raise TransportError("secret_key does not belong to public_key")

    def owner(self) -> dict[bytes, int]:
        """{public key: peer id}."""
        return {k: i for i, k in self.peer_keys.items()}


class _AllowList:
    """ZAP credentials provider: accept exactly the given public keys (z85 bytes)."""

    def __init__(self, keys: Sequence[bytes]):
        self.keys = frozenset(keys)
        self.denied = 0
        self.last_denied: bytes | None = None  # the last refused key (public: fine to log)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            self.denied += 1
            self.last_denied = key
        return ok


# the socket-monitor events of a failed incoming handshake, and how the first one is described on the console
HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
}
_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "security mechanism mismatch (a client without --secure?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic error (a public key used without its secret key?)",
}


class Gatekeeper:
    """A secure ROUTER's ZAP handler (started before the ROUTER binds: without one libzmq accepts any client key)
    and its handshake monitor, a thread of its own (a monitor socket is a PAIR: one reader). Counts every failed
    incoming handshake, by kind, and says the first one through ``log``."""

    def __init__(self, ctx: zmq.Context, curve: CurveConfig, my_id: int, endpoint: str,
                 log: Callable[[str], None] | None):
        self.ctx, self.curve, self.my_id, self.endpoint, self.log = ctx, curve, my_id, endpoint, log
        self.rejected_handshakes = 0
        self.handshake_failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._auth: Any = None          # zmq.auth.thread.ThreadAuthenticator
        self._allow: _AllowList | None = None
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()

    @property
    def rejected_keys(self) -> int:
        """CURVE handshakes the ZAP handler refused (client key not allowed)."""
        return self._allow.denied if self._allow is not None else 0

    def start_auth(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("deca_p2p.transport.zap"))
        try:
            auth.start()
        except zmq.ZMQError as e:
            try:
                auth.stop()
            except Exception:
                pass
            if e.errno == zmq.EADDRINUSE:
                raise TransportError("a secure Transport needs a zmq context of its own "
                                     "(this one already has a ZAP handler)") from None
            raise TransportError(f"cannot start the ZAP handler: {_zmq_reason(e)}") from None
        self._allow = _AllowList(list(self.curve.peer_keys.values()))
        auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._allow)
        self._auth = auth

    def stop_auth(self) -> None:
        auth, self._auth = self._auth, None
        if auth is not None:
            try:
                auth.stop()
            except Exception:
                pass

    def start_monitor(self, router: zmq.Socket) -> None:
        """Watch ROUTER's failed handshakes (call before it binds: no refused handshake goes uncounted)."""
        addr = f"inproc://deca-handshakes-{self.my_id}-{secrets.token_hex(6)}"
        events = zmq.EVENT_MONITOR_STOPPED
        for ev in HANDSHAKE_EVENTS:
            events |= ev
        router.monitor(addr, events)
        ready = threading.Event()
        self._monitor_stop.clear()
        self._monitor = threading.Thread(target=self._watch, args=(addr, ready),
                                         name=f"deca-handshakes-{self.my_id}", daemon=True)
        self._monitor.start()
        ready.wait(5.0)

    def stop_monitor(self, router: zmq.Socket | None) -> None:
        thread, self._monitor = self._monitor, None
        if thread is None:
            return
        if router is not None:
            try:
                router.disable_monitor()  # sends EVENT_MONITOR_STOPPED: the thread ends
            except zmq.ZMQError:
                pass
        self._monitor_stop.set()
        thread.join(2.0)

    def _watch(self, addr: str, ready: threading.Event) -> None:
        from zmq.utils.monitor import parse_monitor_message

        sock = self.ctx.socket(zmq.PAIR)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            ready.set()
            while True:
                if sock.poll(200, zmq.POLLIN):
                    ev = parse_monitor_message(sock.recv_multipart())
                    if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                        break
                    self.count(ev["event"], ev["value"])
                elif self._monitor_stop.is_set():
                    break
        except Exception:  # never let the monitor take the peer down; counting is best effort
            pass
        finally:
            ready.set()
            sock.close(linger=0)

    def count(self, event: int, value: int) -> None:
        """Count one monitor event (a failed handshake; other events are ignored)."""
        kind = HANDSHAKE_EVENTS.get(event)
        if kind is None:
            return
        with self._lock:
            self.rejected_handshakes += 1
            self.handshake_failures[kind] = self.handshake_failures.get(kind, 0) + 1
            first = self.rejected_handshakes == 1
        if first and self.log is not None:
            if kind == "auth":
                key = self._allow.last_denied if self._allow is not None else None
                why = f"the client's CURVE key {key.decode('ascii', 'replace') if key else ''} is not in the " \
                      f"bootstrap file (ZAP status {value})"
            elif kind == "protocol":
                why = _PROTOCOL_ERRORS.get(value, f"ZMTP protocol error {value:#x}")
            else:
                why = "the connection failed before the handshake completed"
            try:
                self.log(f"refused a connection to {self.endpoint}: {' '.join(why.split())}; every refused handshake "
                         f"is counted in the metrics (rejected_handshakes)")
            except Exception:
                pass
