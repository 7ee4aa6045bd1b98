"""What every `deca-peer` command shares: the one-line error for a user's mistake, and reading a topology."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import click


def fail(msg: str, code: int = 2) -> NoReturn:
    """One-line error on stderr and exit 2 (bad user input; 3: the training diverged)."""
    click.echo(f"error: {msg}", err=True)
    raise SystemExit(code)


def make_run_dir(path) -> None:
    """Create the run directory before anything runs: a path under a plain file or in /proc is one line here,
    not a traceback from deep inside a run."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create run directory {path}: {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"cannot write to run directory {path}: permission denied")


def load_topology(path: str):
    from deca_p2p.topology import TopologyError, load

    try:
        return load(path)
    except TopologyError as e:
        fail(str(e))


def user_errors():
    """Exceptions that mean the user's input is wrong: one line, exit 2."""
    from deca_p2p.config import ConfigError
    from deca_p2p.data import DataError
    from deca_p2p.models import ModelError
    from deca_p2p.keys import KeysError
    from deca_p2p.topology import TopologyError

    from deca_p2p.checkpoint import CheckpointError

    return (ConfigError, DataError, ModelError, TopologyError, KeysError, CheckpointError)
