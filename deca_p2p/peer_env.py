"""The process environment a peer runs best in, and `deca-peer start` re-executing itself into it.

glibc reads its malloc tunables once, when the process starts, so a peer that was started without them (by hand,
by srun, by a user's script) can only get them by re-executing itself. `cluster` sets them in its fork server.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

HUGETLB = ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
REEXECUTED = "DECA_PEER_REEXECUTED"  # set in the re-executed process: never twice, whatever a wrapper strips


def _glibc_has_hugetlb() -> bool:
    """glibc >= 2.35 knows glibc.malloc.hugetlb (older ones ignore it, so a re-exec would buy nothing)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except (ValueError, OSError, AttributeError):
        return False


def peer_env(environ: Mapping[str, str] = os.environ, *, threads: bool = True) -> dict[str, str]:
    """What a peer's environment adds to ENVIRON (never overriding a key the user set).

    Transparent huge pages for malloc: page faults dominate big zero-copy transfers (DESIGN §6); measured x2.2 peer
    exchange goodput on 64-256 MiB blocks here, 4-11% less on 1-16 MiB ones (benchmarks/results/wire_throughput.md).
    With THREADS, also one OpenMP/BLAS thread until the peer sets its own count (`--threads`): `cluster`'s
    importing fork server then has no thread pool to lose in a fork.
    """
    wanted = [HUGETLB] + ([("OMP_NUM_THREADS", "1")] if threads else [])
    return {k: v for k, v in wanted if k not in environ}


def reexec_env(argv: list[str], environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute `deca-peer start` with, or None to run as we are.

    Only for `start` (ARGV without the program: the subcommand first), only when the user has not set
    GLIBC_TUNABLES (their setting wins), only on a glibc that knows the tunable, and only once.
    """
    if not argv or argv[0] != "start" or REEXECUTED in environ or not _glibc_has_hugetlb():
        return None
    added = peer_env(environ, threads=False)
    return {**environ, **added, REEXECUTED: "1"} if added else None


def maybe_reexec() -> None:
    """Called by the `deca-peer` entry point before anything heavy is imported: replace this process with itself in the
    peer environment (same pid, so srun, shells and process managers see no difference)."""
    env = reexec_env(sys.argv[1:], os.environ)
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # this interpreter, its own flags
    except OSError:
        pass  # run without huge pages rather than not at all
