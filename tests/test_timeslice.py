"""timeslice.py: the training thread's longer CPU slice (the default while it waits), read back from the kernel, on
that thread only. Where the kernel has no per-task slices (< 6.12, not Linux) every call is a no-op, which is tested too."""
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from deca_p2p.timeslice import current_slice_ms, default_slice, request_slice


def _proc_slice_ns(tid: int) -> int | None:
    """The slice the scheduler itself uses for thread TID (se.slice in /proc/<pid>/task/<tid>/sched), or None where
    the kernel does not show it (no scheduler debugging, an older kernel, not Linux)."""
    try:
        text = Path(f"/proc/self/task/{tid}/sched").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(float(line.split(":")[1]))
    return None


# where both the syscall and /proc report a thread's slice, the /proc value is the scheduler's own
needs_slices = pytest.mark.skipif(current_slice_ms() is None or _proc_slice_ns(threading.get_native_id()) is None,
                                  reason="this kernel has no per-task time slices (Linux >= 6.12) or does not show "
                                         "them in /proc/<pid>/task/<tid>/sched")


def _in_thread(fn):
    """Run FN in a fresh thread (the attribute is per thread: the test process keeps its own) and return its result."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=fn()))
    t.start()
    t.join()
    return out["r"]


def test_zero_asks_for_nothing():
    def probe():
        before = current_slice_ms()
        with default_slice(active=False):
            inside = current_slice_ms()
        return before, request_slice(0), inside, current_slice_ms()
    before, got, inside, after = _in_thread(probe)
    assert got is None and inside == before == after


def test_unsupported_is_a_quiet_no_op():
    if current_slice_ms() is not None:
        pytest.skip("this kernel supports per-task slices (the no-op path is for those that do not)")
    assert request_slice(30) is None
    with default_slice() as s:
        pass
    assert not s.active


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
def test_the_default_slice_while_waiting_then_the_long_one_again():
    def probe():
        tid = threading.get_native_id()
        default = _proc_slice_ns(tid)
        nice = os.nice(1)
        granted = request_slice(30)
        waiting = default_slice()
        seen = []
        for _ in range(2):  # reused, as gossip reuses it at every wait
            with waiting:
                seen.append(_proc_slice_ns(tid))
            seen.append(_proc_slice_ns(tid))
        return granted, default, seen, nice, os.nice(0)
    granted, default, seen, nice, nice_after = _in_thread(probe)
    assert granted == 30.0
    assert seen == [default, 30_000_000, default, 30_000_000]
    assert nice_after == nice


@needs_slices
def test_the_default_slice_on_a_thread_that_had_it_already_changes_nothing():
    def probe():
        tid = threading.get_native_id()
        before = _proc_slice_ns(tid)
        with default_slice() as waiting:
            inside = _proc_slice_ns(tid)
        return before, inside, _proc_slice_ns(tid), waiting.before
    before, inside, after, restored = _in_thread(probe)
    assert before == inside == after and restored == 0  # nothing to restore: it stays on the kernel's default


def _new_io_threads(before: set[int], wait_s: float = 5.0) -> set[int]:
    """The ZeroMQ I/O threads started since BEFORE was listed: libzmq names each from inside it once it runs, so
    right after ``ctx.socket()`` its name may not be there yet (peer.py asks only after the barrier)."""
    from deca_p2p.timeslice import ZMQ_IO_THREADS, threads_named
    deadline = time.monotonic() + wait_s
    while True:
        new = set(threads_named(ZMQ_IO_THREADS)) - before
        if new or time.monotonic() > deadline:
            return new
        time.sleep(0.001)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are listed from Linux's /proc")
def test_threads_named_finds_zmqs_io_thread_and_nothing_for_a_name_no_thread_has():
    zmq = pytest.importorskip("zmq")
    from deca_p2p.timeslice import ZMQ_IO_THREADS, threads_named
    before = set(threads_named(ZMQ_IO_THREADS))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # libzmq starts a context's threads with its first socket
    try:
        new = _new_io_threads(before)
        assert len(new) == 1  # one I/O thread per context (zmq's default)
        assert threading.get_native_id() not in new
        assert threads_named("no thread is called this") == []
    finally:
        sock.close(linger=0)
        ctx.term()


@needs_slices
def test_the_io_slice_goes_to_zmqs_io_thread_not_to_the_caller():
    """peer.py gives ZeroMQ's I/O thread the training thread's slice (timeslice.request_io_slice says why); read back
    from the scheduler itself. The calling thread keeps its own. (Every zmq I/O thread of this process gets it: the
    other contexts' are left with 30 ms, which changes nothing for the tests.)"""
    import zmq

    from deca_p2p.timeslice import ZMQ_IO_THREADS, request_io_slice, threads_named
    before = set(threads_named(ZMQ_IO_THREADS))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        (io,) = _new_io_threads(before)
        default_ns = _proc_slice_ns(io)

        def probe():
            mine = _proc_slice_ns(threading.get_native_id())
            return request_io_slice(0), _proc_slice_ns(io), request_io_slice(30), mine, \
                _proc_slice_ns(threading.get_native_id())
        none, unchanged, granted, mine_before, mine_after = _in_thread(probe)
        assert none == [] and unchanged == default_ns  # 0: the kernel's default stays
        assert 30.0 in granted and current_slice_ms(io) == 30.0 and _proc_slice_ns(io) == 30_000_000
        assert mine_after == mine_before  # the caller's own slice did not change
    finally:
        sock.close(linger=0)
        ctx.term()
