"""Start the peer processes of `deca-peer cluster`: each one `deca-peer start`, forked from a server that has
already imported torch, transformers and deca_p2p.

Every peer is still its own OS process in its own session, running the same `start` command a user types, with its
own log file. Only the start-up is shared: importing torch and transformers (and the model's modeling module)
cost ~4 CPU-s per process here, 8 times over on the default ring8 (a profile, not a committed table; what is left
before the first step is in benchmarks/results/cluster_efficiency.md). The server is multiprocessing's `forkserver`: one
single-threaded process that only imports (it runs no torch operation, so no OpenMP pool is forked) and forks a
peer on request. Where forkserver is missing, peers start as plain subprocesses.
"""
from __future__ import annotations

import importlib
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .peer_env import peer_env

PRELOAD = ["deca_p2p.cli", "deca_p2p.peer", "deca_p2p.average", "transformers.generation.utils"]


def model_module(model_path: str | None) -> str | None:
    """The transformers modeling module of the model the peers will load (imported once, in the server)."""
    from .paths import BASE_MODEL_DIR  # not .models: it imports torch, which the fork server should import first

    try:
        cfg = json.loads((Path(model_path or BASE_MODEL_DIR) / "config.json").read_text())
        kind = str(cfg["model_type"]).replace("-", "_")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the peers will say what is wrong with the model; nothing to preload
    return f"transformers.models.{kind}.modeling_{kind}"


def import_model_module(model_path: str | None) -> None:
    """Import the model's modeling module now (a peer started on its own would import it when loading the model).
    A module that cannot be imported is left to the model loading, which says what is wrong."""
    mod = model_module(model_path)
    if mod is not None:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


class PeerProcess:
    """The part of subprocess.Popen that `cluster` uses, over a forked multiprocessing.Process."""

    def __init__(self, proc: multiprocessing.process.BaseProcess):
        self._p = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def poll(self) -> int | None:
        return self._p.exitcode

    @property
    def sentinel(self) -> int:
        """Readable once the peer has exited (multiprocessing.connection.wait)."""
        return self._p.sentinel

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(f"peer pid {self.pid}", timeout)
        return self._p.exitcode

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _peer_main(argv: list[str], log_path: str) -> None:
    """In the forked child: become a session leader (Ctrl-C in the terminal reaches only `cluster`, which stops the
    peers in order), write to the peer's log, run `deca-peer start`. click raises SystemExit with its exit code."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)  # the peer installs its own stop handlers
    from .cli import main

    main(args=argv, prog_name="deca-peer")


class Launcher:
    """Starts peers: forked from one preloaded server, or (without forkserver) as subprocesses."""

    def __init__(self, model_path: str | None = None, extra_preload: Sequence[str] = ()):
        self._ctx = None
        if "forkserver" in multiprocessing.get_all_start_methods():
            self._ctx = multiprocessing.get_context("forkserver")
            mod = model_module(model_path)
            self._ctx.set_forkserver_preload(["deca_p2p.preload_start", *PRELOAD, *[m for m in (mod, *extra_preload) if m],
                                              "deca_p2p.preload_done"])
            # start the server now: it imports while our caller prepares the run
            self._with_env(multiprocessing.forkserver.ensure_running)

    def _with_env(self, fn, *args):
        added = peer_env()  # only keys we do not have: the server (started once) inherits them, we keep ours
        os.environ.update(added)
        try:
            return fn(*args)
        finally:
            for k in added:
                os.environ.pop(k, None)

    def start(self, argv: list[str], log_path: Path) -> PeerProcess | subprocess.Popen:
        """`deca-peer <argv>` as a new process writing to `log_path`."""
        if self._ctx is None:
            with open(log_path, "w") as out:
                return subprocess.Popen([sys.executable, "-m", "deca_p2p.cli", *argv], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **peer_env()})
        p = self._ctx.Process(target=_peer_main, args=(argv, str(log_path)), daemon=False)
        self._with_env(p.start)
        return PeerProcess(p)

    def close(self) -> None:
        """Stop the fork server (and multiprocessing's resource tracker) now: `cluster` leaves no process behind.
        Both would exit by themselves once we do; stopping them here makes that true when we return."""
        if self._ctx is None:
            return
        from multiprocessing import forkserver, resource_tracker

        for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
            stop = getattr(helper, "_stop", None)  # a private method (CPython's own tests use it): absent, we skip it
            if stop is not None:
                try:
                    stop()
                except (OSError, ChildProcessError):
                    pass

    def submit(self, fn, *args) -> "Pending":
        """fn(*args) in a process forked from the server (its imports are done), while the caller goes on; without
        forkserver, here and now. `.get()` waits for the result (an exception in fn is raised there)."""
        return Pending(self._ctx, fn, args)


def _send_result(conn, fn, args) -> None:
    """In the forked child: fn(*args) and its outcome down `conn`. What cannot be pickled is sent as a message (what
    pickles but cannot be unpickled is reported by Pending.get)."""
    try:
        outcome = (True, fn(*args))
    except Exception as e:  # noqa: BLE001 - re-raised by Pending.get in the caller
        outcome = (False, e)
    try:
        conn.send(outcome)  # pickles first, then writes: a pickling error sends nothing
    except Exception as e:  # noqa: BLE001
        conn.send((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}" if not outcome[0] else
                                       f"the result could not be sent back: {e}")))
    finally:
        conn.close()


class Pending:
    """One call in a forked process and a pipe for its result. Not a multiprocessing Pool: a Pool's queues hold
    POSIX semaphores, which `Launcher.close` (stopping the resource tracker) unlinked before their finalizers ran,
    and each then printed a FileNotFoundError traceback as `cluster` exited."""

    def __init__(self, ctx, fn, args):
        self._proc = None
        if ctx is None:
            try:
                self._value, self._error = fn(*args), None
            except Exception as e:  # noqa: BLE001 - raised by get(), as the child's would be
                self._value, self._error = None, e
            return
        self._conn, child_end = ctx.Pipe(duplex=False)
        try:
            self._proc = ctx.Process(target=_send_result, args=(child_end, fn, args), daemon=True)
            self._proc.start()
        except BaseException:
            self._conn.close()
            raise
        finally:
            child_end.close()  # ours: the child holds its own copy, so its exit ends our recv with EOFError

    def get(self):
        if self._proc is None:
            if self._error is not None:
                raise self._error
            return self._value
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"its process ended without a result (exit code {self._proc.exitcode})") from None
        except Exception as e:  # noqa: BLE001 - sent, but not rebuilt here (e.g. an exception class's own arguments)
            raise RuntimeError(f"its result could not be read: {type(e).__name__}: {e}") from None
        finally:
            self._conn.close()
            self._proc.join()
        if not ok:
            raise value
        return value
