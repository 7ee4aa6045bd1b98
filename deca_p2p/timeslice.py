"""A longer CPU time slice for a peer's training thread: Linux's sched_setattr with ``sched_runtime`` (kernel >= 6.12).

Where peers share cores (`make cluster`: 8 peers on 2), the fair scheduler's default slice (1.4 ms on this 2-core
machine; it grows with log2 of the cores) cuts every local step (~27 ms of CPU here) into a dozen pieces, and each
switch to another peer's step costs cache refills. So the training thread asks for a slice about one step long
(`request_slice`), except while it waits for a neighbour's block (`default_slice` around the wait in gossip.py): a
thread that wakes with a long slice gets a late deadline and waits behind the computing peers before it reads the
block. Terminal runs, not committed (ring8, 6 rounds, wall s; ring8 at 1 Gbit/s and L = 0, share of the link; two
or more runs each): the long slice throughout 35.9-37.1 s and 0.38-0.52 of the link; the long slice only while computing 36.3-38.1 s
and 0.64-0.72; the long slice but for the wait 36.3, 36.9 s and 0.62-0.84; the kernel's slice 37.8-38.6 s and
0.51-0.62. `cluster_efficiency.md` and `bandwidth_latency.md` have the committed runs. Only the calling thread
changes, and the threads it starts later (torch's OpenMP workers with `--threads` > 1 start on the first step), and,
by name, ZeroMQ's I/O thread (`request_io_slice`, which says why; `benchmarks/results/io_slice.md` measures it). The
link threads, started before and asleep on links without emulation (link.py), and pyzmq's garbage-collector thread
keep the default (with the slice, the latter changed nothing measurable: `benchmarks/results/wakeups_gc_slice.md`).

Unprivileged; the policy (SCHED_OTHER or SCHED_BATCH) and nice value are kept. Elsewhere (another OS, an older
kernel, a real-time policy a user chose) nothing changes and `request_slice` says so by returning None.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import struct
import sys

MAX_SLICE_MS = 100.0   # the kernel clamps a requested slice to [0.1, 100] ms
MIN_SLICE_MS = 0.1
_FAIR = (0, 3)         # SCHED_OTHER, SCHED_BATCH: the policies whose sched_runtime is the slice
_ATTR = "IIQiIQQQII"   # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes): size, policy, flags, nice, priority,
#                        runtime, deadline, period, util_min, util_max
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "riscv64": (274, 275)}  # (sched_setattr, sched_getattr)
_RESET_ON_FORK = 0x01  # a flag an unprivileged thread may not clear: kept as read
ZMQ_IO_THREADS = "ZMQbg/IO/"  # how libzmq names its I/O threads (ZMQbg/IO/0, ...; its reaper is ZMQbg/Reaper)


@functools.lru_cache(maxsize=1)
def _libc():
    if (not sys.platform.startswith("linux") or platform.machine() not in _SYSCALLS
            or ctypes.sizeof(ctypes.c_void_p) != 8):  # a 32-bit Python on a 64-bit kernel has other syscall numbers
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _get(libc, tid: int = 0) -> list | None:
    size = struct.calcsize(_ATTR)
    buf = ctypes.create_string_buffer(size)
    if libc.syscall(_SYSCALLS[platform.machine()][1], tid, buf, size, 0) != 0:
        return None
    return list(struct.unpack(_ATTR, buf.raw))


def _fair_attr(tid: int = 0) -> tuple | None:
    """(libc, the sched_attr of thread TID (0: the calling one)) where its slice can be set: Linux, a fair policy
    (SCHED_OTHER, SCHED_BATCH) and a kernel that reports a slice (>= 6.12); else None."""
    libc = _libc()
    attr = None if libc is None else _get(libc, tid)
    if attr is None or attr[1] not in _FAIR or attr[5] == 0:
        return None
    return libc, attr


def current_slice_ms(tid: int = 0) -> float | None:
    """The slice in ms of thread TID (0: this one) as the kernel reports it (None where it cannot be read or is not
    a slice)."""
    got = _fair_attr(tid)
    return None if got is None else got[1][5] / 1e6


def _set_runtime_ns(libc, attr: list, ns: int, tid: int = 0) -> bool:
    """Write ATTR (as just read) back with a slice of NS (0: the kernel's default)."""
    # flags: only reset-on-fork, as read; policy and nice written back as read
    attr = [struct.calcsize(_ATTR), attr[1], attr[2] & _RESET_ON_FORK, *attr[3:5], ns, *attr[6:]]
    buf = ctypes.create_string_buffer(struct.pack(_ATTR, *attr), attr[0])
    return libc.syscall(_SYSCALLS[platform.machine()][0], tid, buf, 0) == 0


_SUPPORTED: bool | None = None


def supported() -> bool:
    """Whether this thread's slice can be set here (Linux >= 6.12 reports one; read once)."""
    global _SUPPORTED
    if _SUPPORTED is None:
        _SUPPORTED = current_slice_ms() is not None
    return _SUPPORTED


class default_slice:
    """``with default_slice():`` the calling thread has the kernel's default slice inside (asked for with a slice of
    0), and the one it had before afterwards. For waiting: a thread that wakes with a long slice gets a late deadline
    and waits behind computing threads. A no-op where unsupported or when ACTIVE is false."""

    def __init__(self, active: bool = True):
        self.active = bool(active) and supported()
        self.before = 0

    def __enter__(self) -> "default_slice":
        got = _fair_attr() if self.active else None
        if got is not None:
            libc, attr = got
            _set_runtime_ns(libc, attr, 0)
            # it had the default already: nothing to restore
            self.before = 0 if current_slice_ms() == attr[5] / 1e6 else attr[5]
        return self

    def __exit__(self, *exc) -> None:
        got = _fair_attr() if self.active and self.before else None
        if got is not None:
            _set_runtime_ns(*got, self.before)


def request_slice(ms: float, tid: int = 0) -> float | None:
    """Ask for a time slice of MS milliseconds for thread TID of this process (0: the calling thread; and the
    threads it starts later).

    Returns the slice the kernel then reports (it clamps to [0.1, 100] ms), or None where nothing changed: not
    Linux, a kernel without custom slices (< 6.12 reports no slice), a non-fair policy, no such thread, or MS <= 0
    (keep the kernel's default). Never raises: a scheduling hint must not stop a peer."""
    got = _fair_attr(tid) if ms and ms > 0 else None  # none reported: not Linux, or a kernel before custom slices
    if got is None or not _set_runtime_ns(*got, int(min(MAX_SLICE_MS, max(MIN_SLICE_MS, ms)) * 1e6), tid):
        return None
    return current_slice_ms(tid)


def threads_named(prefix: str) -> list[int]:
    """The ids of this process's threads whose name (/proc/self/task/*/comm) starts with PREFIX; [] off Linux."""
    tids = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith(prefix):
                    tids.append(int(tid))
        except (OSError, ValueError):  # it ended meanwhile
            continue
    return sorted(tids)


def request_io_slice(ms: float) -> list[float]:
    """The same slice for this process's ZeroMQ I/O threads (named by libzmq, from inside each thread once it runs):
    the slices the kernel then reports, one per thread it took (none where unsupported, MS <= 0, or no zmq context
    has a named I/O thread yet: call it once the transport has carried messages).

    Why: with more peers than cores, an I/O thread woken by a neighbour's bytes has the default (short) slice and so
    an early deadline, and preempts whichever training thread is computing, on every wake-up (about 90 a second per
    peer in `make cluster`). With the training thread's slice its deadline is as late as theirs: it runs when a
    slice ends or a thread blocks, a few ms later, and the steps keep their caches. The price is that later read:
    on an emulated link a block is then read after its due time (peer.py asks for it only where no link is
    emulated, unless told otherwise). `benchmarks/results/io_slice.md` measures both."""
    got = (request_slice(ms, tid) for tid in threads_named(ZMQ_IO_THREADS)) if ms and ms > 0 else ()
    return [s for s in got if s is not None]
