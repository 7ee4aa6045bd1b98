"""plan_shared.py: the replayed schedule of peers sharing cores, against what must hold of any such schedule."""
import pytest
from hypothesis import given, settings, strategies as st

from deca_p2p.plan_shared import shared_cores_step


def ring(n):
    return {i: [(i - 1) % n, (i + 1) % n] for i in range(n)}


def test_a_core_per_peer_is_compute_then_exchange():
    assert shared_cores_step(0.03, 0.05, ring(8), 8) == pytest.approx(0.08)
    assert shared_cores_step(0.03, 0.05, ring(8), 8, overlap=True) == pytest.approx(0.05)  # the block travels meanwhile
    assert shared_cores_step(0.03, 0.01, ring(8), 8, overlap=True) == pytest.approx(0.03)


def test_no_exchange_time_keeps_every_core_busy():
    assert shared_cores_step(0.03, 0.0, ring(8), 2) == pytest.approx(4 * 0.03)


def test_a_lone_peer_waits_for_nobody():
    assert shared_cores_step(0.03, 1.0, {0: []}, 1) == pytest.approx(0.03)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 10), cores=st.integers(1, 4), cpu=st.floats(0.001, 0.1), comm=st.floats(0.0, 0.3),
       overlap=st.booleans())
def test_between_the_cores_bound_and_all_at_once(n, cores, cpu, comm, overlap):
    step = shared_cores_step(cpu, comm, ring(n), cores, overlap=overlap)
    # a steady-state mean over a finite replay: the bounds hold to within a few per cent of a job (the window's edges)
    per_core = -(-n // cores) if cores < n else 1  # jobs the busiest core runs per step
    tol = 0.05 * cpu
    assert step >= (n * cpu / cores if cores < n else cpu) - tol
    assert step >= (max(cpu, comm) if overlap else cpu + comm) - tol
    assert step <= per_core * cpu + comm + tol


def test_bad_arguments():
    with pytest.raises(ValueError):
        shared_cores_step(0.03, 0.0, ring(4), 0)
