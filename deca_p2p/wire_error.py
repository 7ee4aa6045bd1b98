"""The one error of the wire protocol (PROTOCOL.md): ``WireError``, with a stable reason slug for metrics counters.

Its own module so that the codecs (codecs.py) and the message format (wire.py) can both raise it.
"""

from __future__ import annotations

from typing import Any

# Every reason slug WireError may carry (stable; meant for metrics counters).
REASONS = frozenset(
    {
        "frames",  # not a frame list, no frames, a frame that is not a buffer, wrong number of payload frames
        "header_size",  # header frame over MAX_HEADER_BYTES
        "msgpack",  # header is not exactly one valid msgpack object
        "schema",  # header/tensor map structure: not a map, missing/extra key, wrongly typed field, tensors on non-block
        "version",  # v != VERSION
        "kind",  # unknown kind
        "codec",  # unknown codec, invalid codec field (e.g. negative scale)
        "dtype",  # dtype not on the allow-list or not produced by the message's codec
        "shape",  # shape malformed (not a list of ints in range), or differs from what check_names expects
        "nbytes",  # nbytes malformed, != prod(shape)*itemsize, or != payload frame length
        "payload_size",  # total payload over max_payload_bytes
        "non_finite",  # NaN/Inf in stats, in a codec field, or in decoded values
        "names",  # bad/duplicate tensor name, or names differ from those expected
        "no_base",  # a delta arrived but there is no public copy to apply it to (ask for a resync)
        "internal",  # a bug in wire.py surfaced while decoding (should never happen; tests check)
    }
)


class WireError(ValueError):
    """A message (or message-to-be) violates the protocol (PROTOCOL.md).

    ``reason`` is a short stable slug from REASONS, for metrics; ``str(err)`` is a one-line message.
    """

    def __init__(self, reason: str, message: str | None = None):
        self.reason = reason
        self.message = " ".join((message or reason).split())  # one line
        super().__init__(reason, self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self):
        return (type(self), (self.reason, self.message))


def short(x: Any, n: int = 60) -> str:
    try:
        r = repr(x)
    except Exception:  # pragma: no cover - defensive
        r = f"<{type(x).__name__}>"
    return r if len(r) <= n else r[: n - 3] + "..."

