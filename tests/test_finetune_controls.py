"""Fine-tuning controls: schedule with warm-up, gradient accumulation, checkpointing, weight decay, clipping."""
import math
import random

import pytest
import torch

from deca_p2p.config import ConfigError, make_config
from deca_p2p.encoding import Batcher
from deca_p2p.models import load_model
from deca_p2p.optim import DECA
from deca_p2p.tasks import make_task_examples
from deca_p2p.trainer import PeerTrainer, lr_factors


def test_schedules_follow_transformers_get_scheduler():
    from transformers import get_scheduler

    for name in ("linear", "cosine"):
        cfg = make_config(None, {"lr_schedule": name, "warmup_steps": 10})
        f = lr_factors(cfg, 100)
        ref = get_scheduler(name, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                            num_warmup_steps=10, num_training_steps=100)
        for step in range(100):
            assert f(step) == pytest.approx(ref.get_last_lr()[0], abs=1e-12), (name, step)
            ref.optimizer.step()
            ref.step()
    f = lr_factors(make_config(None, {"warmup_ratio": 0.1}), 50)  # constant with 5 warm-up steps
    assert [round(f(s), 3) for s in range(7)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert lr_factors(make_config(None, {}), 50)(0) == 1.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_config(None, {"lr_schedule": "exp"})
    with pytest.raises(ConfigError, match="warmup_ratio"):
        make_config(None, {"warmup_ratio": 1.5})


def test_one_peer_with_weight_decay_equals_torch_adamw_on_matrices():
    torch.manual_seed(0)
    init = [torch.randn(6, 4), torch.randn(4)]
    ours = [t.clone() for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    opt = DECA(ours, lr=1e-2, discrepancy="none", weight_decay=0.1)
    adamw = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
                              lr=1e-2)
    for _ in range(20):
        g = [torch.randn_like(t) for t in init]
        for p, gi in zip(ours, g):
            p.grad = gi.clone()
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.local_step()
        opt.mix([p.clone() for p in ours])
        adamw.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b.detach(), atol=1e-6)


@pytest.fixture(scope="module")
def setup(deca_cache):
    from deca_p2p.models import default_model_path

    _, tok = load_model(default_model_path())
    examples = make_task_examples("rev", 64, random.Random(0))
    return tok, examples


def _trainer(setup, **over):
    from deca_p2p.models import default_model_path

    tok, examples = setup
    model, _ = load_model(default_model_path())
    cfg = make_config(None, {"batch_size": 4, "rounds": 1, "inner_steps": 4, **over})
    t = PeerTrainer(model, Batcher(examples, tok, cfg.batch_size, 0, 64), cfg)
    t.activate(1)
    return t


def test_gradient_accumulation_averages_micro_batches(setup):
    acc = _trainer(setup, grad_accum=2, lr=0.0)
    one = _trainer(setup, lr=0.0)
    st = acc.local_step(0)
    g_acc = [p.grad.clone() for p in acc.active.params]
    l1 = one.local_step(0)["loss"]
    g1 = [p.grad.clone() for p in one.active.params]
    one.active.zero_grad()
    l2 = one.local_step(0)["loss"]  # the second micro-batch: the generator moved on exactly as in `acc`
    g2 = [p.grad.clone() for p in one.active.params]
    assert st["loss"] == pytest.approx((l1 + l2) / 2, rel=1e-6)
    for a, b, c in zip(g_acc, g1, g2):
        assert torch.allclose(a, (b + c) / 2, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_step(setup):
    plain, ckpt = _trainer(setup, lr=1e-3), _trainer(setup, lr=1e-3, gradient_checkpointing=True)
    assert getattr(ckpt.model, "is_activation_checkpointing", None) or ckpt.model.is_gradient_checkpointing
    a, b = plain.local_step(0), ckpt.local_step(0)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for p, q in zip(plain.active.params, ckpt.active.params):
        assert torch.allclose(p, q, atol=1e-6)


def test_clipping_bounds_the_gradient_norm_and_schedule_sets_lr(setup):
    t = _trainer(setup, max_grad_norm=0.01, lr=1e-3, lr_schedule="linear", warmup_steps=2)
    st = t.local_step(1)
    assert st["grad_norm_unclipped"] > 0.01
    assert st["grad_norm"] == pytest.approx(0.01, rel=1e-3)
    assert st["lr"] == pytest.approx(0.5e-3)
    assert math.isfinite(st["loss"])
