"""timeslice.py: the training thread's longer CPU slice while it computes, read back from the kernel (/proc), on that
thread only."""
import os
import threading
from pathlib import Path

import pytest

from deca_p2p.timeslice import current_slice_ms, long_slice, request_slice

needs_slices = pytest.mark.skipif(current_slice_ms() is None,
                                  reason="this kernel has no per-task time slices (Linux >= 6.12) or is not Linux")


def _proc_slice_ns(tid: int) -> int:
    """The slice the scheduler itself uses for thread TID (se.slice in /proc/<pid>/task/<tid>/sched)."""
    for line in Path(f"/proc/self/task/{tid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(float(line.split(":")[1]))
    raise AssertionError("no se.slice line")


def _in_thread(fn):
    """Run FN in a fresh thread (the attribute is per thread: the test process keeps its own) and return its result."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=fn()))
    t.start()
    t.join()
    return out["r"]


def test_zero_keeps_the_kernel_default():
    def probe():
        before = _proc_slice_ns(threading.get_native_id())
        return before, request_slice(0), _proc_slice_ns(threading.get_native_id())
    before, got, after = _in_thread(probe)
    assert got is None and after == before


@needs_slices
def test_the_calling_thread_and_its_later_threads_get_the_slice_others_do_not():
    main_before = _proc_slice_ns(threading.get_native_id())

    def probe():
        nice = os.nice(2)  # Linux: this thread's nice value; sched_setattr must write it back unchanged
        granted = request_slice(30)
        child = _in_thread(lambda: _proc_slice_ns(threading.get_native_id()))  # started afterwards: inherits
        return granted, _proc_slice_ns(threading.get_native_id()), child, nice, os.nice(0)
    granted, mine, child, nice, nice_after = _in_thread(probe)
    assert granted == 30.0 and mine == 30_000_000 and child == 30_000_000
    assert nice_after == nice
    assert _proc_slice_ns(threading.get_native_id()) == main_before  # the test's own thread is untouched


@needs_slices
def test_the_kernel_clamps_and_we_report_what_it_granted():
    assert _in_thread(lambda: request_slice(500)) == 100.0
    assert _in_thread(lambda: request_slice(0.01)) == 0.1


@needs_slices
def test_long_slice_while_computing_then_the_one_before():
    def probe():
        tid = threading.get_native_id()
        nice = os.nice(1)
        before = _proc_slice_ns(tid)
        computing = long_slice(30)
        seen = []
        for _ in range(2):  # reused, as the peer reuses it every step
            with computing:
                seen.append(_proc_slice_ns(tid))
            seen.append(_proc_slice_ns(tid))
        return before, seen, nice, os.nice(0)
    before, seen, nice, nice_after = _in_thread(probe)
    assert seen == [30_000_000, before, 30_000_000, before]
    assert nice_after == nice


def test_long_slice_of_zero_changes_nothing():
    def probe():
        tid = threading.get_native_id()
        before = _proc_slice_ns(tid)
        with long_slice(0) as s:
            inside = _proc_slice_ns(tid)
        return before, inside, s.ns
    before, inside, ns = _in_thread(probe)
    assert inside == before and ns == 0
