"""Resume with real peer processes: a network re-started after it finished restores every parameter bit for bit
(the final evaluation repeats exactly) and leaves its final checkpoints unchanged, on architectures whose saved keys
differ from their in-memory names (GPT-NeoX's embed_out, Mixtral's fused experts)."""
import hashlib
import os
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.metrics import records
from test_architectures import ARCHS, IDS, _write

pytestmark = pytest.mark.integration


def _digest(ckpt):
    """Of every weight file (a peer's checkpoint is block-sharded)."""
    h = hashlib.sha256()
    for f in sorted(ckpt.glob("model*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ["gpt-neox", "mixtral"])
def test_restart_after_finish_changes_nothing(arch, deca_cache, tmp_path):
    cls, kw, *_ = ARCHS[arch]
    model = _write(tmp_path / arch, cls(**IDS, **kw))
    topo = tmp_path / "c2.json"
    topo.write_text(subprocess.run(deca_peer_cmd("topology", "gen", "complete", 2), capture_output=True, text=True,
                                   check=True).stdout)
    run = tmp_path / "run"
    cmd = deca_peer_cmd("cluster", "--topology", topo, "--model", model, "--run-dir", run, "--no-live", "--no-average",
                        "--base-port", free_base_port(2), "--rounds", 1, "--inner-steps", 2, "--batch-size", 4,
                        "--max-len", 64, "--exchange-timeout", 5, "--set", "train_per_task=20", "--set", "eval_per_task=2")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ckpts = {i: (run / f"peer-{i}" / "checkpoint" / "latest").resolve() for i in (0, 1)}
    before = {i: _digest(c) for i, c in ckpts.items()}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    for i in (0, 1):
        assert (run / f"peer-{i}" / "checkpoint" / "latest").resolve() == ckpts[i]
        assert _digest(ckpts[i]) == before[i], "the final checkpoint is unchanged"
        finals = records(run, i, "final")
        assert len(finals) == 2
        assert finals[1]["eval_loss"] == finals[0]["eval_loss"], "restored bit for bit: the same evaluation"
        resume = records(run, i, "resume")
        assert resume  # (its missing / unexpected counts are 0 by construction: peer.py loads the whole state dict)
