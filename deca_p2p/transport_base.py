"""What the transport modules share: their error, the socket constants and the wire's lazy import."""

from __future__ import annotations

import zmq

HELLO_INTERVAL_S = 0.2          # barrier: re-send hellos to unfinished neighbours this often
SNDHWM = 4                      # DEALER send high-water mark (messages)
RCVHWM = 1000                   # ROUTER receive high-water mark per connection (messages)
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
_POLL_SLICE_S = 0.05            # sender threads re-check for close() at least this often


class TransportError(RuntimeError):
    """A transport failure with a one-line, user-facing message."""


def _wire():
    from . import wire  # imported by start(), not at module import: wire pulls in torch

    return wire


def _zmq_reason(e: zmq.ZMQError) -> str:
    if e.errno == zmq.EADDRINUSE:
        return "address already in use"
    msg = str(e.strerror or e)
    return msg[:1].lower() + msg[1:]


