"""A longer CPU time slice for the training thread: Linux's sched_setattr with ``sched_runtime`` (kernel >= 6.12).

Where peers share cores (`make cluster`: 8 peers on 2), the fair scheduler's default slice (1.4 ms on this 2-core
machine; it grows with log2 of the cores) cuts every local step (~27 ms of CPU here) into a dozen pieces, and each
switch to another peer's step costs cache refills. A peer's training thread therefore asks for a slice about one
step long: in `cluster_efficiency.md` the same run costs less CPU and wall time side by side. Only the thread that
calls this changes, and the threads it starts afterwards: the transport's I/O and link threads are started before, so
they keep the default slice and still move a message as soon as it lands.

Unprivileged; the policy (SCHED_OTHER or SCHED_BATCH) and nice value are kept. Elsewhere (another OS, an older
kernel, a real-time policy a user chose) nothing changes and `request_slice` says so by returning None.
"""
from __future__ import annotations

import ctypes
import platform
import struct
import sys

MAX_SLICE_MS = 100.0   # the kernel clamps a requested slice to [0.1, 100] ms
MIN_SLICE_MS = 0.1
_FAIR = (0, 3)         # SCHED_OTHER, SCHED_BATCH: the policies whose sched_runtime is the slice
_ATTR = "IIQiIQQQII"   # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes): size, policy, flags, nice, priority,
#                        runtime, deadline, period, util_min, util_max
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}  # (sched_setattr, sched_getattr)


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
    attr[0] = struct.calcsize(_ATTR)
    attr[2] = 0  # flags: none (the policy and nice value are written back as read)
    attr[5] = int(min(MAX_SLICE_MS, max(MIN_SLICE_MS, ms)) * 1e6)
    buf = ctypes.create_string_buffer(struct.pack(_ATTR, *attr), attr[0])
    if libc.syscall(_SYSCALLS[platform.machine()][0], 0, buf, 0) != 0:
        return None
    return current_slice_ms()

