"""Shared fixtures: a private model cache (the embedded default model is built once per session) and free ports."""
import os
import sys
from pathlib import Path

import pytest

from deca_p2p.bootstrap import free_base_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def deca_cache(tmp_path_factory):
    """DECA_CACHE for this test session, with the default model already built."""
    cache = tmp_path_factory.mktemp("deca-cache")
    os.environ["DECA_CACHE"] = str(cache)
    from deca_p2p.models import ensure_default_model

    ensure_default_model()
    return cache


def deca_peer_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "deca_p2p.cli", *map(str, args)]
