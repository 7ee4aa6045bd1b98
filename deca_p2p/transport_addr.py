"""Addresses of the transport: the peer id a plain-mode routing id names, and where to bind the ROUTER for an
endpoint. No zmq sockets (binding a plain socket is how ``_bind_address`` tests that an address is local)."""

from __future__ import annotations

import re
import socket as _socket

from .transport_base import TransportError

_ROUTING_ID_RE = re.compile(rb"peer-(0|[1-9][0-9]{0,9})")
_TCP_RE = re.compile(r"tcp://(\[[^\]]*\]|[^:/\[\]]+):(\d+)")


def _parse_src(routing_id: bytes) -> int | None:
    m = _ROUTING_ID_RE.fullmatch(routing_id)
    return int(m.group(1)) if m else None


def _bind_address(endpoint: str) -> str:
    """Where to bind for ``endpoint``: itself when its host is a local address, else ``tcp://*:port``.

    Host names are resolved here (libzmq does not resolve names on bind) and the address is
    tested by binding an ordinary socket to it, which succeeds exactly for this machine's addresses.
    """
    m = _TCP_RE.fullmatch(endpoint)
    if m is None:
        if endpoint.startswith(("ipc://", "inproc://")):
            return endpoint
        raise TransportError(f"invalid endpoint {endpoint!r}: expected tcp://host:port")
    host, port = m.group(1), m.group(2)
    if host in ("*", "0.0.0.0"):
        return f"tcp://*:{port}"
    if host.startswith("["):
        return endpoint  # IPv6 literal: bind as given (IPV6 is enabled on the socket)
    try:
        ip = _socket.getaddrinfo(host, None, _socket.AF_INET, _socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return f"tcp://*:{port}"
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.bind((ip, 0))
    except OSError:
        return f"tcp://*:{port}"
    finally:
        s.close()
    return f"tcp://{ip}:{port}"
