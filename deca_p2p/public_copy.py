"""Public copies θ̂ and whole blocks: what a peer sends of its active block (PROTOCOL.md §8).

A lossless codec (``raw``) sends θ½ itself, whole (``encode_whole``, from a ``snapshot`` the caller may train on
past); a lossy one sends deltas against a public copy θ̂ that the sender and every receiver keep bit-identical
(``PublicCopy``), which makes them error feedback. Pure: no sockets; wire.py encodes and decodes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .codecs import as_cpu_float, get_codec
from .wire import Message, encode, encode_with_roundtrip
from .wire_error import WireError, short

__all__ = ["PublicCopy", "encode_whole", "snapshot"]


class PublicCopy:
    """The sender's public copy θ̂ of its active block, kept identically by the sender and by every receiver.

    Block payloads are deltas: the sender transmits q = codec(θ½ − θ̂) and both sides apply
    θ̂ += decode(q); a ``full`` message replaces θ̂ with decode(codec(θ½)). With lossy codecs this
    is error-feedback (CHOCO-style) gossip: what the codec loses in one step is still in the next delta.

    ``tensors`` (float32, owned here, never sent zero-copy, None until the first full message) is
    updated in place by deltas; treat it as read-only outside this class.

    Sender: ``encode_block(current, ...)`` does it all, or ``outgoing`` -> ``encode_with_roundtrip``
    -> ``apply(decoded, full)``. Receiver: ``apply(decode(frames).tensors, full)``. Because the
    sender applies exactly the tensors receivers decode, the copies stay bit-identical.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget θ̂ (new activation, restart): the next message must be ``full``."""
        self.tensors = None

    def outgoing(self, current: Mapping[str, torch.Tensor], codec: str, full: bool) -> dict[str, torch.Tensor]:
        """The float32 tensors to put in a block Message: ``current`` (full) or ``current − θ̂`` (delta).

        Always freshly allocated (never aliasing ``current`` or θ̂), so they can go out zero-copy
        while the caller keeps updating its parameters. Does not change θ̂; call ``apply`` with what
        ``encode_with_roundtrip`` returns. Raises ValueError for a delta without θ̂ or with names /
        shapes that differ from θ̂.
        """
        get_codec(codec)
        if full:
            return snapshot(current)
        if self.tensors is None:
            raise ValueError("PublicCopy: no public copy yet; the first message must be full")
        if set(current) != set(self.tensors):
            raise ValueError(f"PublicCopy: names {sorted(current)} differ from the public copy's {sorted(self.tensors)}")
        out = {}
        for k, v in current.items():
            v = as_cpu_float(v)
            base = self.tensors[k]
            if v.shape != base.shape:
                raise ValueError(f"PublicCopy: {k!r} has shape {tuple(v.shape)}, public copy {tuple(base.shape)}")
            d = torch.sub(v, base)  # fresh; float32 (float64 sources are narrowed below)
            out[k] = d if d.dtype == torch.float32 else d.to(torch.float32)
        return out

    def apply(self, decoded: Mapping[str, torch.Tensor], full: bool) -> None:
        """Advance θ̂ by decoded values: replace (full, copying) or add in place (delta).

        Validates everything before changing anything. WireError "no_base" for a delta without θ̂
        (ask for a resync), "names"/"shape" when the delta does not match θ̂.
        """
        if full:
            self.tensors = {k: _fresh_f32(v) for k, v in decoded.items()}
            return
        if self.tensors is None:
            raise WireError("no_base", "delta received but there is no public copy (needs a full message)")
        if set(decoded) != set(self.tensors):
            raise WireError("names", f"delta names {short(sorted(decoded), 120)} differ from the public copy's")
        for k, v in decoded.items():
            if v.shape != self.tensors[k].shape:
                raise WireError("shape", f"delta {k!r} has shape {tuple(v.shape)}, public copy {tuple(self.tensors[k].shape)}")
        for k, v in decoded.items():
            self.tensors[k].add_(v)

    def encode_block(
        self,
        current: Mapping[str, torch.Tensor],
        *,
        src: int,
        codec: str = "raw",
        full: bool = False,
        inc: int = 0,
        round: int = 0,
        block: int = 0,
        step: int = 0,
        stats: Mapping[str, float] | None = None,
        check_finite: bool = True,
    ) -> list:
        """Build, encode and account one block message: returns its frames (send them zero-copy).

        θ̂ advances by exactly what receivers will decode; on any error θ̂ is unchanged. ``check_finite``:
        see ``encode`` (a peer passes False: receivers validate anyway, and it watches its loss itself).
        """
        msg = Message(
            kind="block", src=src, inc=inc, round=round, block=block, step=step, codec=codec, full=full,
            tensors=self.outgoing(current, codec, full), stats=dict(stats or {}),
        )
        frames, decoded = encode_with_roundtrip(msg, check_finite=check_finite)
        self.apply(decoded, full)
        return frames


def encode_whole(current: Mapping[str, torch.Tensor], *, codec: str = "raw", check_finite: bool = True,
                 owned: bool = False, **fields) -> list:
    """Frames of a block message carrying θ½ itself, whole (a lossless codec: PROTOCOL.md §8.1), taken as a snapshot
    so it can go out zero-copy while the caller trains on (owned=True: `current` is such a snapshot already, the
    caller's to give away). ``fields``: src, inc, round, block, step, stats."""
    if not get_codec(codec).lossless:
        raise ValueError(f"encode_whole: codec {codec!r} is lossy; its blocks go as deltas (PublicCopy.encode_block)")
    return encode(Message(kind="block", codec=codec, full=True, tensors=dict(current) if owned else snapshot(current),
                          **fields), check_finite=check_finite)


def snapshot(current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh float32 copies of a block, to send zero-copy while the caller goes on changing its parameters."""
    return {k: _fresh_f32(as_cpu_float(v)) for k, v in current.items()}


def _fresh_f32(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=torch.float32)
    out.copy_(t)
    return out
