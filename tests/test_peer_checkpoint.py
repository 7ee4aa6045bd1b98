"""A peer's last checkpoint is read back and compared with its model; a stale one is saved again in full."""
import json

from deca_p2p.checkpoint import differing_keys, latest
from deca_p2p.config import make_config
from deca_p2p.metrics import MetricsLog, records
from deca_p2p.peer import _checkpoint, _verify_last_checkpoint
from deca_p2p.runtime import PeerData, embedded_data, load, make_batcher
from deca_p2p.trainer import PeerTrainer

SMALL = {"rounds": 1, "inner_steps": 2, "batch_size": 4, "max_len": 64, "train_per_task": 20, "eval_per_task": 2}


def _train(t: PeerTrainer, blk: int) -> None:
    t.activate(blk)
    for step in range(2):
        t.local_step(step)
        t.apply_mix([x.clone() for x in t.block().values()])


def test_a_stale_last_checkpoint_is_found_and_saved_again_in_full(deca_cache, tmp_path):
    cfg = make_config(None, SMALL)
    lm = load(cfg)
    shards, evals = embedded_data(cfg, [0, 1])
    t = PeerTrainer(lm.model, make_batcher(cfg, lm, 0, PeerData(shards[0], evals, "shard", "eval")), cfg)
    root = tmp_path / "run" / "peer-0" / "checkpoint"
    log = MetricsLog(tmp_path / "run", 0)
    _train(t, 0)
    _checkpoint(t, lm.tokenizer, root, 0, 0, 0, changed=set(t.blocks[0].param_names))
    _train(t, 1)
    _checkpoint(t, lm.tokenizer, root, 1, 0, 1, changed=set(t.blocks[1].param_names))  # the peer's bookkeeping
    assert _verify_last_checkpoint(t, lm.tokenizer, root, (1, 0, 1), log, 0) == 0
    _train(t, 2)
    _checkpoint(t, lm.tokenizer, root, 2, 0, 2, changed=set())  # a slip: block 2 trained, not said
    stale = differing_keys(t.model, latest(root))
    assert stale and all(k in t.blocks[2].param_names for k in stale)  # its shard was linked, stale
    assert _verify_last_checkpoint(t, lm.tokenizer, root, (2, 0, 2), log, 0) == len(stale)
    log.close()
    assert differing_keys(t.model, latest(root)) == []
    assert json.loads((latest(root) / "deca_state.json").read_text())["activation"] == 2
    rec = records(tmp_path / "run", 0, "checkpoint_repaired")
    assert [r["tensors"] for r in rec] == [len(stale)] and rec[0]["first"] == stale[0]
