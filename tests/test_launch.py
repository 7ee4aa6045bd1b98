"""launch.py: `cluster`'s peers are `deca-peer` commands in processes of their own, forked from a preloaded server
(or, without forkserver, plain subprocesses): their exit codes, logs and environment are the command's."""
import multiprocessing
import os
import subprocess
import sys

import pytest

from conftest import free_base_port
from deca_p2p import launch
from deca_p2p.launch import Launcher


@pytest.fixture(params=["forkserver", "subprocess"])
def launcher(request, monkeypatch):
    if request.param == "subprocess":  # a platform without forkserver
        monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    lau = Launcher()
    yield lau
    lau.close()


def test_a_peer_command_runs_in_its_own_process_with_its_log_and_exit_code(launcher, tmp_path):
    ok = launcher.start(["--version"], tmp_path / "ok.log")
    bad = launcher.start(["start", "--id", "0", "--neighbors", str(tmp_path / "missing.json")], tmp_path / "bad.log")
    assert ok.pid != os.getpid() and bad.pid != ok.pid
    assert ok.wait(120) == 0 and ok.poll() == 0 and ok.returncode == 0
    assert "version" in (tmp_path / "ok.log").read_text()
    assert bad.wait(120) == 2  # a user mistake: one line and exit code 2, as from the shell
    lines = (tmp_path / "bad.log").read_text().strip().splitlines()
    assert lines and "missing.json" in lines[-1] and "Traceback" not in "".join(lines)


def test_a_peer_that_does_not_stop_is_killed(launcher, tmp_path):
    topo = tmp_path / "pair.json"
    topo.write_text('{"name": "pair", "nodes": [0, 1], "edges": [[0, 1]]}')
    p = launcher.start(["start", "--id", "0", "--neighbors", str(topo), "--run-dir", str(tmp_path / "run"),
                        "--base-port", str(free_base_port(2)), "--hello-timeout", "600"], tmp_path / "p.log")
    with pytest.raises(subprocess.TimeoutExpired):  # waits for a neighbour that never comes
        p.wait(1.0)
    assert p.poll() is None
    p.kill()
    assert p.wait(60) == -9


def test_forked_peers_get_the_peer_environment(monkeypatch):
    for k in ("GLIBC_TUNABLES", "OMP_NUM_THREADS"):  # as on a machine where nobody set them
        monkeypatch.delenv(k, raising=False)
    lau = Launcher()
    try:
        # evaluated in a child of the fork server
        env = {k: lau.submit(os.getenv, k).get() for k in ("GLIBC_TUNABLES", "OMP_NUM_THREADS")}
    finally:
        lau.close()
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "OMP_NUM_THREADS": "1"}
    assert "GLIBC_TUNABLES" not in os.environ  # ours is left as it was


FORKSERVER = pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                                reason="no forkserver here: submit runs its function in this process")


def test_the_fork_server_starts_before_the_caller_imports_torch():
    """`cluster` starts the server first: torch imported here before would delay the server's import (the other core
    idle meanwhile)."""
    code = ("import sys; from deca_p2p.launch import Launcher; lau = Launcher(); "
            "print('torch' in sys.modules); lau.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@FORKSERVER
def test_forked_peers_run_the_collector_with_the_imports_frozen():
    """The server paused the collector for its imports (preload_start) and froze what they made (preload_done)."""
    import gc

    lau = Launcher()
    try:
        enabled, frozen = lau.submit(gc.isenabled).get(), lau.submit(gc.get_freeze_count).get()
    finally:
        lau.close()
    assert enabled is True
    assert frozen > 100_000  # torch and transformers: hundreds of thousands of objects


def _fail(msg):
    raise ValueError(msg)


def test_submit_returns_the_result_or_raises_the_error_in_the_caller(launcher):
    assert launcher.submit(divmod, 7, 2).get() == (3, 1)
    with pytest.raises(ValueError, match="no such thing"):
        launcher.submit(_fail, "no such thing").get()


class _Unreadable(Exception):
    def __init__(self, a, b):  # pickles, but unpickling calls __init__ with one argument
        super().__init__(f"{a} {b}")


def _raise_unreadable():
    raise _Unreadable("x", "y")


@FORKSERVER
def test_submit_says_so_when_its_result_cannot_be_read():
    lau = Launcher()
    try:
        with pytest.raises(RuntimeError, match="could not be read"):
            lau.submit(_raise_unreadable).get()
    finally:
        lau.close()


@FORKSERVER
def test_submit_says_so_when_its_process_dies_without_a_result():
    lau = Launcher()
    try:
        with pytest.raises(RuntimeError, match="exit code 7"):
            lau.submit(os._exit, 7).get()
    finally:
        lau.close()


def test_the_model_module_is_named_from_the_model_config(tmp_path):
    assert launch.model_module(None) == "transformers.models.llama.modeling_llama"  # the embedded model
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    assert launch.model_module(str(tmp_path)) == "transformers.models.gpt_neox.modeling_gpt_neox"
    assert launch.model_module(str(tmp_path / "nowhere")) is None
