"""A longer CPU time slice while a local step computes: Linux's sched_setattr with ``sched_runtime`` (kernel >= 6.12).

Where peers share cores (`make cluster`: 8 peers on 2), the fair scheduler's default slice (1.4 ms on this 2-core
machine; it grows with log2 of the cores) cuts every local step (~27 ms of CPU here) into a dozen pieces, and each
switch to another peer's step costs cache refills. So the training thread asks for a slice about one step long
while it computes (`long_slice`), and goes back to the default for the exchange: a thread that wakes with a long
slice gets a late deadline and waits behind the computing peers, which held back reading a neighbour's block (ring8
at 1 Gbit/s: 0.38-0.52 of the link with the long slice throughout, 0.64-0.67 with it around the step only; terminal
runs). Only the calling thread changes: the transport's I/O and link threads keep the default.

Unprivileged; the policy (SCHED_OTHER or SCHED_BATCH) and nice value are kept. Elsewhere (another OS, an older
kernel, a real-time policy a user chose) nothing changes and `request_slice` says so by returning None.
"""
from __future__ import annotations

import ctypes
import functools
import platform
import struct
import sys

MAX_SLICE_MS = 100.0   # the kernel clamps a requested slice to [0.1, 100] ms
MIN_SLICE_MS = 0.1
_FAIR = (0, 3)         # SCHED_OTHER, SCHED_BATCH: the policies whose sched_runtime is the slice
_ATTR = "IIQiIQQQII"   # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes): size, policy, flags, nice, priority,
#                        runtime, deadline, period, util_min, util_max
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # (sched_setattr, sched_getattr)


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux") or platform.machine() not in _SYSCALLS:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _get(libc) -> list | None:
    size = struct.calcsize(_ATTR)
    buf = ctypes.create_string_buffer(size)
    if libc.syscall(_SYSCALLS[platform.machine()][1], 0, buf, size, 0) != 0:
        return None
    return list(struct.unpack(_ATTR, buf.raw))


def current_slice_ms() -> float | None:
    """This thread's slice in ms as the kernel reports it (None where it cannot be read or is not a slice)."""
    libc = _libc()
    attr = None if libc is None else _get(libc)
    if attr is None or attr[1] not in _FAIR or attr[5] == 0:
        return None
    return attr[5] / 1e6


def _set_runtime_ns(libc, ns: int) -> bool:
    attr = _get(libc)
    if attr is None or attr[1] not in _FAIR:
        return False
    attr[0], attr[2], attr[5] = struct.calcsize(_ATTR), 0, ns  # flags: none; policy and nice written back as read
    buf = ctypes.create_string_buffer(struct.pack(_ATTR, *attr), attr[0])
    return libc.syscall(_SYSCALLS[platform.machine()][0], 0, buf, 0) == 0


_SUPPORTED: bool | None = None


def supported() -> bool:
    """Whether this thread's slice can be set here (Linux >= 6.12 reports one; read once)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = current_slice_ms() is not None
    return _SUPPORTED


class long_slice:
    """``with long_slice(ms):`` the calling thread runs with a slice of MS milliseconds, and afterwards with the one
    it had before (the same length; the kernel then counts it as chosen). A no-op where unsupported or MS <= 0."""

    def __init__(self, ms: float):
        self.ns = int(min(MAX_SLICE_MS, max(MIN_SLICE_MS, ms)) * 1e6) if ms and ms > 0 and supported() else 0
        self.before = 0

    def __enter__(self) -> "long_slice":
        if self.ns:
            libc = _libc()
            attr = _get(libc)
            self.before = 0 if attr is None else attr[5]
            _set_runtime_ns(libc, self.ns)
        return self

    def __exit__(self, *exc) -> None:
        if self.ns and self.before:
            _set_runtime_ns(_libc(), self.before)


def request_slice(ms: float) -> float | None:
    """Ask for a time slice of MS milliseconds for the calling thread (and the threads it starts later).

    Returns the slice the kernel then reports (it clamps to [0.1, 100] ms), or None where nothing changed: not
    Linux, a kernel without custom slices (< 6.12 reports no slice), a non-fair policy, or MS <= 0 (keep the kernel's
    default). Never raises: a scheduling hint must not stop a peer."""
    if not ms or ms <= 0:
        return None
    libc = _libc()
    attr = None if libc is None else _get(libc)
    if attr is None or attr[1] not in _FAIR or attr[5] == 0:  # no slice reported: this kernel predates them
        return None
    if not _set_runtime_ns(libc, int(min(MAX_SLICE_MS, max(MIN_SLICE_MS, ms)) * 1e6)):
        return None
    return current_slice_ms()
