"""Partitioning Hugging Face causal LMs into blocks, block order, activation and fp32 master copies."""
import hashlib
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deca_p2p.blocks import ActiveBlock, block_order, order_key, partition, whole_model_block


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32))


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_partition_covers_every_parameter_once(make):
    model = make()
    names = [n for n, _ in model.named_parameters()]
    layers_only = partition(model)
    assert [b.name for b in layers_only] == [f"layer.{i}" for i in range(len(layers_only))]
    full = partition(model, embeddings=True, head=True)
    assert full[0].name == "embeddings" and full[-1].name == "head"
    flat = [n for b in full for n in b.param_names]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert [b.index for b in full] == list(range(len(full)))
    assert whole_model_block(model).param_names == tuple(names)


def test_llama_head_block_holds_final_norm_and_lm_head():
    head = partition(_llama(), head=True)[-1]
    assert set(head.param_names) == {"model.norm.weight", "lm_head.weight"}


def test_block_orders():
    assert block_order(4, "ascending", 0, 0) == [0, 1, 2, 3]
    assert block_order(4, "descending", 3, 0) == [3, 2, 1, 0]
    a = block_order(10, "random", 2, seed=7)
    assert sorted(a) == list(range(10))
    assert a == block_order(10, "random", 2, seed=7)  # every peer computes the same order
    assert any(block_order(10, "random", r, seed=7) != a for r in range(3, 8))
    with pytest.raises(ValueError, match="block order"):
        block_order(3, "sideways", 0, 0)


# PROTOCOL.md §7.3 and Appendix C: the `random` order of protocol version 2, pinned (every implementation, in any
# language, must reproduce these; the in-process simulator and real peers share blocks.block_order)
RANDOM_ORDER_VECTORS = [
    (6, 0, 0, [5, 0, 4, 1, 2, 3]),
    (6, 0, 1, [5, 1, 4, 0, 2, 3]),
    (6, 0, 2, [1, 3, 4, 2, 0, 5]),
    (6, 1, 0, [0, 4, 1, 5, 3, 2]),
    (6, 42, 0, [4, 1, 5, 0, 3, 2]),
    (6, 42, 3, [5, 0, 4, 1, 2, 3]),
    (6, -3, 0, [1, 2, 3, 5, 0, 4]),
    (12, 42, 0, [6, 9, 7, 4, 1, 5, 8, 11, 10, 0, 3, 2]),
]


@pytest.mark.parametrize("n, seed, rnd, want", RANDOM_ORDER_VECTORS)
def test_random_order_test_vectors(n, seed, rnd, want):
    assert block_order(n, "random", rnd, seed) == want


def test_random_order_is_the_sha256_sort_of_protocol_md():
    assert order_key(0, 0, 0).hex() == "4e33b84e7697018094bb83f06881903995021ea1d4c0cc644cc30025dbadbd6f"
    for n, seed, rnd, want in RANDOM_ORDER_VECTORS:
        keys = {i: hashlib.sha256(f"deca-p2p/order/{seed}/{rnd}/{i}".encode()).digest() for i in range(n)}
        assert sorted(range(n), key=keys.__getitem__) == want
    # the table in PROTOCOL.md's Appendix C is this one
    text = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    appendix = text[text.index("## Appendix C"):]
    rows = re.findall(r"^\| (\d+) \| (-?\d+) \| (\d+) \| \[([\d, ]+)\] \|$", appendix, re.M)
    assert [(int(b), int(s), int(r), [int(x) for x in o.split(",")]) for b, s, r, o in rows] == RANDOM_ORDER_VECTORS


def test_activation_freezes_everything_else_and_trains_only_the_block():
    model = _llama()
    blocks = partition(model, embeddings=True, head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    active = ActiveBlock(model, blocks[1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(blocks[1].param_names)
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in active.params)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    with torch.no_grad():
        for p in active.params:
            p.sub_(0.1 * p.grad)
    active.release()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(blocks[1].param_names)
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_model_gets_fp32_master_copy():
    model = _llama(torch.bfloat16)
    block = partition(model)[0]
    active = ActiveBlock(model, block)
    assert active.has_master and all(p.dtype == torch.float32 for p in active.params)
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    active.grads_to_master()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in active.params)
    assert all(p.grad is None for p in active.model_params)  # the bf16 grads are freed once copied
    with torch.no_grad():
        for m in active.params:
            m.add_(1.0)
    active.master_to_model()
    named = dict(model.named_parameters())
    for n, m in zip(active.names, active.params):
        assert torch.equal(named[n], m.to(torch.bfloat16))
    active.release()
    assert active.params == []


def test_layers_per_block_groups_consecutive_layers(deca_cache):
    from deca_p2p.blocks import partition
    from deca_p2p.models import default_model_path, load_model

    model, _ = load_model(default_model_path())
    one = partition(model, embeddings=True, head=True)
    two = partition(model, embeddings=True, head=True, layers_per_block=2)
    n_layers = len(one) - 2
    assert len(two) == 2 + (n_layers + 1) // 2
    assert two[1].param_names == one[1].param_names + one[2].param_names
    assert [b.index for b in two] == list(range(len(two)))
    assert sorted(n for b in two for n in b.param_names) == sorted(n for b in one for n in b.param_names)


def _peer_trainer(**overrides):
    import random

    from deca_p2p.config import make_config
    from deca_p2p.encoding import Batcher
    from deca_p2p.models import DEFAULT_MODEL_CONFIG, _build_tokenizer
    from deca_p2p.tasks import make_task_examples
    from deca_p2p.trainer import PeerTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**DEFAULT_MODEL_CONFIG, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2}))
    cfg = make_config(None, {"batch_size": 4, "rounds": 1, "inner_steps": 2, **overrides})
    examples = make_task_examples("rev", 16, random.Random(0))
    return PeerTrainer(model, Batcher(examples, _build_tokenizer(), 4, 0, 32), cfg)


def test_a_block_switch_frees_the_previous_blocks_state_and_trims_the_heap(monkeypatch):
    """The previous block's optimizer state is gone before the heap is trimmed (else the trim could not hand its
    pages back: benchmarks/results/memory.md), and the trim runs once per activation, not per step."""
    import weakref

    import deca_p2p.trainer as trainer_mod

    t = _peer_trainer()
    t.activate(0)
    t.local_step()
    old = weakref.ref(t.opt)
    alive_at_trim = []
    monkeypatch.setattr(trainer_mod, "malloc_trim", lambda: alive_at_trim.append(old() is not None))
    t.local_step()
    t.activate(1)
    assert alive_at_trim == [False] and old() is None
    # the same block again (random order across a round boundary): a fresh activation, as for a resumed peer
    t.local_step()
    again = weakref.ref(t.opt)
    t.activate(1)
    assert alive_at_trim == [False, False] and again() is None
    # decentralized Adam's one whole-model block keeps its state from round to round
    whole = _peer_trainer(algo="dadam")
    whole.activate(0)
    opt = whole.opt
    whole.activate(0)
    assert whole.opt is opt and len(whole.blocks) == 1
