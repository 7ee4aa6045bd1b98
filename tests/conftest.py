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


def max_diff_to_simulation(run_dir, topo_path, cfg: dict) -> float:
    """The largest absolute difference between any parameter of the real peers' final checkpoints under RUN_DIR
    (peer-<i>/checkpoint/latest) and the same peer's model in the in-process ``simulate`` run of TOPO_PATH with
    CFG (the settings the peers were started with). 0.0: the network changed nothing."""
    from deca_p2p.checkpoint import latest, read_weights
    from deca_p2p.config import make_config
    from deca_p2p.simulate import simulate
    from deca_p2p.topology import load as load_topology

    topo = load_topology(topo_path)
    res = simulate(topo, make_config(None, cfg))
    worst = 0.0
    for i in topo.nodes:
        ckpt = latest(Path(run_dir) / f"peer-{i}" / "checkpoint")
        assert ckpt is not None, f"peer {i} wrote no checkpoint"
        net = read_weights(ckpt)
        ref = dict(res.models[i].named_parameters())
        assert set(net) <= set(ref)
        for name, t in net.items():
            worst = max(worst, float((t.float() - ref[name].detach().float()).abs().max()))
    return worst
