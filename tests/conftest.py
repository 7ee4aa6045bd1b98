"""Shared fixtures: a private model cache (the embedded default model is built once per session) and free ports."""
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def deca_cache(tmp_path_factory):
    """DECA_CACHE for this test session, with the default model already built."""
    cache = tmp_path_factory.mktemp("deca-cache")
    os.environ["DECA_CACHE"] = str(cache)
    from deca_p2p.data import ensure_default_model

    ensure_default_model()
    return cache


def free_base_port(n: int) -> int:
    """A port p such that p .. p+n-1 are all free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free ports found")


def deca_peer_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "deca_p2p.cli", *map(str, args)]
