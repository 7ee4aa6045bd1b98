"""cpu_parts.CpuParts: thread CPU by part, not wall time."""
import threading
import time

from deca_p2p.cpu_parts import CpuParts


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_parts_count_this_threads_cpu_not_waiting_nor_other_threads():
    cpu = CpuParts()
    with cpu.part("step"):
        _spin(0.05)
    with cpu.part("receive"):
        time.sleep(0.2)  # waiting for a neighbour costs no CPU
        t = threading.Thread(target=_spin, args=(0.1,))  # another thread's CPU is not this thread's
        t.start()
        t.join()
    cpu.add("step", 0.5)
    rec = cpu.record()
    assert list(rec) == ["step", "receive"]  # the report's order, not the order first seen
    assert 0.55 <= rec["step"] < 0.6
    assert rec["receive"] < 0.03


def test_a_part_that_raises_is_still_counted():
    cpu = CpuParts()
    try:
        with cpu.part("checkpoint"):
            _spin(0.02)
            raise OSError("disk full")
    except OSError:
        pass
    assert cpu.record()["checkpoint"] >= 0.02
