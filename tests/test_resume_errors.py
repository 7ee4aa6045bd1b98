"""A peer started on a run directory whose checkpoint it cannot resume from (one `simulate --save` wrote, or a
damaged one) says so in one line and exits 2, rather than a traceback."""
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port


GEN = "[" + ",".join(["7"] * 5056) + "]"  # a CPU torch generator's state is 5056 bytes


@pytest.mark.parametrize("state", [
    None, "{not json", '{"activation": 0}',
    '{"activation": -7, "round": 0, "batcher_generator": %s}' % GEN,  # would train the last activations first
    '{"activation": 2.9, "round": 0, "batcher_generator": %s}' % GEN,
    '{"activation": 0, "round": 0, "batcher_generator": [1, 2, 3]}',
    '{"activation": 0, "round": 0, "batcher_generator": [300]}',
], ids=["no-state", "garbage", "partial", "negative", "fraction", "short-generator", "not-bytes"])
def test_start_on_a_checkpoint_it_cannot_resume_from_is_one_line(state, tmp_path):
    from deca_p2p.checkpoint import save_atomic
    from deca_p2p.models import default_model_path, load_model

    model, tok = load_model(default_model_path())
    run = tmp_path / "run"
    save_atomic(model, tok, run / "peer-0" / "checkpoint", "final",
                extra_files=None if state is None else {"deca_state.json": state})
    p = subprocess.run(deca_peer_cmd("start", "--id", 0, "--neighbors", REPO / "topologies" / "ring4.json",
                                     "--run-dir", run, "--base-port", free_base_port(4), "--threads", 1,
                                     "--hello-timeout", 5, "--set", "train_per_task=20", "--set", "eval_per_task=2"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stdout[-1500:] + p.stderr[-1500:]
    assert "Traceback" not in p.stdout + p.stderr
    assert len(err) == 1 and "is not a peer checkpoint this peer can resume from" in err[0], err
