"""`deca-peer start` re-executes itself with huge-page malloc unless the user set GLIBC_TUNABLES."""
import os
import subprocess
import sys

import pytest

from conftest import REPO
from deca_p2p import peer_env

HUGE = "glibc.malloc.hugetlb=1"
needs_tunable = pytest.mark.skipif(not peer_env._glibc_has_hugetlb(), reason="glibc older than 2.35 (no hugetlb tunable)")


@needs_tunable
def test_only_start_without_a_user_setting_reexecutes():
    assert peer_env.reexec_env(["start", "--id", "0"], {"PATH": "/bin"}) == {
        "PATH": "/bin", "GLIBC_TUNABLES": HUGE, peer_env.REEXECUTED: "1"}
    assert peer_env.reexec_env(["start"], {peer_env.REEXECUTED: "1"}) is None  # once, even if the tunable was stripped
    assert peer_env.reexec_env(["start"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None  # the user's wins
    assert peer_env.reexec_env(["cluster", "--topology", "t.json"], {}) is None
    assert peer_env.reexec_env([], {}) is None


def test_the_peer_environment_never_overrides_the_user():
    assert peer_env.peer_env({}) == {"GLIBC_TUNABLES": HUGE, "OMP_NUM_THREADS": "1"}
    assert peer_env.peer_env({"OMP_NUM_THREADS": "4"}, threads=False) == {"GLIBC_TUNABLES": HUGE}
    assert peer_env.peer_env({"GLIBC_TUNABLES": "x", "OMP_NUM_THREADS": "4"}) == {}


@needs_tunable
def test_a_real_process_replaces_itself_once_and_keeps_its_pid():
    code = ("import os, sys; sys.argv = ['deca-peer', 'start']; print('pid', os.getpid(), flush=True); "
            "from deca_p2p.peer_env import maybe_reexec; maybe_reexec(); "
            "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", peer_env.REEXECUTED)}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60).stdout.split()
    # the program ran twice (once before the exec, once after it), with one pid and the tunable only the second time
    assert out == ["pid", out[1], "pid", out[1], "after", out[1], HUGE], out
