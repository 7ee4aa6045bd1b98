"""The `deca-peer` command."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deca-p2p")
def main() -> None:
    """Peer-to-peer full-parameter fine-tuning with DECA over ZeroMQ."""
