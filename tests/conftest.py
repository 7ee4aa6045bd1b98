"""Shared fixtures: the embedded default model (the packaged base) and free ports."""
import os
import sys
from pathlib import Path

import pytest

from deca_p2p.bootstrap import free_base_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def deca_cache():
    """The embedded default model (the packaged pretrained base, deca_p2p/base_model), checked once per session;
    returns its directory. Nothing is built: tests that need an untrained model call models.build_default_model."""
    from deca_p2p.models import ensure_default_model

    return ensure_default_model()


def deca_peer_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "deca_p2p.cli", *map(str, args)]
