"""The in-process reference network: it learns, and it is deterministic for a seed."""
import torch

from conftest import REPO
from deca_p2p.config import make_config
from deca_p2p.simulate import simulate
from deca_p2p.topology import load

SMALL = {"rounds": 1, "inner_steps": 8, "batch_size": 8, "train_per_task": 100, "eval_per_task": 4,
         "threads": 1, "seed": 1}


def test_short_simulate_on_ring4_lowers_global_eval_loss(deca_cache, tmp_path):
    res = simulate(load(REPO / "topologies" / "ring4.json"), make_config(None, SMALL), run_dir=tmp_path)
    start = res.initial["eval_loss"]
    assert all(r["eval_loss"] < start - 0.3 for r in res.per_peer.values()), (start, res.per_peer)
    assert res.average_model["eval_loss"] < start - 0.3
    assert (tmp_path / "peer-3" / "metrics.jsonl").is_file()


def test_simulate_is_deterministic_for_a_seed(deca_cache):
    cfg = {**SMALL, "inner_steps": 2, "codec": "int8"}
    a = simulate(load(REPO / "topologies" / "ring4.json"), make_config(None, cfg))
    b = simulate(load(REPO / "topologies" / "ring4.json"), make_config(None, cfg))
    for i in a.models:
        for (n, p), (_, q) in zip(a.models[i].named_parameters(), b.models[i].named_parameters()):
            assert torch.equal(p, q), n


def test_simulate_save_writes_checkpoints_that_match_its_models(deca_cache, tmp_path):
    from deca_p2p.checkpoint import latest, restore_weights
    from deca_p2p.models import default_model_path, load_model

    cfg = {**SMALL, "inner_steps": 1}
    res = simulate(load(REPO / "topologies" / "ring4.json"), make_config(None, cfg), run_dir=tmp_path, save=True)
    for i, model in res.models.items():
        ckpt = latest(tmp_path / f"peer-{i}" / "checkpoint")
        assert ckpt is not None and (ckpt / "tokenizer.json").is_file()
        fresh, _ = load_model(default_model_path())
        restore_weights(fresh, ckpt)
        for (n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters()):
            assert torch.equal(p, q), n
