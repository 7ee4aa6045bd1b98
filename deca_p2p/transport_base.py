"""What the transport modules share: their error, the socket constants and the wire's lazy import."""

from __future__ import annotations

import zmq

HELLO_INTERVAL_S = 0.2          # barrier: re-send hellos to unfinished neighbours this often
SNDHWM = 4                      # DEALER send high-water mark (messages)
RCVHWM = 1000                   # ROUTER receive high-water mark per connection (messages)
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000
_POLL_SLICE_S = 0.05            # sender threads re-check for close() at least this often
# libzmq's I/O thread mallocs every incoming frame; Python frees it once gossip drops the message. A flood from
# non-neighbours that queues up while the peer trains (up to RCVHWM messages per connection) leaves glibc holding
# the freed pages, not a leak: measured (issue 11) 60..140 MB held beyond the unattacked twin in the hostile-input
# test, all of it handed back by malloc_trim(0). The ROUTER trims after this many bytes from non-neighbours (a trim
# takes ~1 ms: ~60 per GB of flood); what stays held is about this much.
TRIM_AFTER_UNWANTED_BYTES = 16 << 20


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
