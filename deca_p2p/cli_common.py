"""What every `deca-peer` command shares: the one-line error for a user's mistake, and reading a topology."""
from __future__ import annotations

from typing import NoReturn

import click


def fail(msg: str, code: int = 2) -> NoReturn:
    """One-line error on stderr and exit 2 (bad user input; 3: the training diverged)."""
    click.echo(f"error: {msg}", err=True)
    raise SystemExit(code)


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
