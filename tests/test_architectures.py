"""Any Hugging Face causal LM, correctly: a matrix of tiny random-init architectures.

For each: the partition (one block per decoder layer; embeddings / head = exactly what runs before / after the
stack), a few DECA steps that really change the embeddings, a layer and the head, an HF checkpoint that
`from_pretrained` reads back with no missing/unexpected key, and a strict bit-for-bit `restore_weights`.
Also: non-causal models and too-small embedding tables are refused with one line.
"""
import shutil
import subprocess

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from conftest import REPO, deca_peer_cmd
from deca_p2p.blocks import find_layers, partition
from deca_p2p.checkpoint import CheckpointError, restore_weights, save_atomic
from deca_p2p.config import TrainConfig
from deca_p2p.data import Example

try:  # the Batcher moved from data.py to encoding.py
    from deca_p2p.encoding import Batcher
except ImportError:  # pragma: no cover
    from deca_p2p.data import Batcher
from deca_p2p.models import ModelError, _build_tokenizer, load_model
from deca_p2p.trainer import PeerTrainer

V = 101  # the embedded character tokenizer
IDS = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
           max_position_embeddings=64)

# name -> (config class, kwargs, embeddings block, head block, layer stack)
ARCHS = {
    "llama-tied": (T.LlamaConfig, dict(DEC, tie_word_embeddings=True),
                   {"model.embed_tokens.weight"}, {"model.norm.weight"}, "model.layers"),
    "llama": (T.LlamaConfig, dict(DEC, tie_word_embeddings=False),
              {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
    "qwen2": (T.Qwen2Config, dict(DEC, tie_word_embeddings=False),
              {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
    "mistral": (T.MistralConfig, dict(DEC, tie_word_embeddings=False),
                {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
    "phi3": (T.Phi3Config, dict(DEC, tie_word_embeddings=False),
             {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
    "gemma2": (T.Gemma2Config, dict(DEC, head_dim=16),  # tied by default
               {"model.embed_tokens.weight"}, {"model.norm.weight"}, "model.layers"),
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, n_inner=48),
             {"transformer.wte.weight", "transformer.wpe.weight"},
             {"transformer.ln_f.weight", "transformer.ln_f.bias"}, "transformer.h"),
    "gpt-neox": (T.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64),
                 {"gpt_neox.embed_in.weight"},
                 {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"},
                 "gpt_neox.layers"),
    "opt": (T.OPTConfig, dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=64, word_embed_proj_dim=32),
            {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"},
            {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"},
            "model.decoder.layers"),
    "falcon": (T.FalconConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
               {"transformer.word_embeddings.weight"},
               {"transformer.ln_f.weight", "transformer.ln_f.bias"}, "transformer.h"),
    "mixtral": (T.MixtralConfig, dict(DEC, num_local_experts=4, num_experts_per_tok=2),
                {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
    "qwen2-moe": (T.Qwen2MoeConfig, dict(DEC, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2),
                  {"model.embed_tokens.weight"}, {"model.norm.weight", "lm_head.weight"}, "model.layers"),
}


def _write(path, config, seed=0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    _build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {name: _write(root / name, cls(**IDS, **kw)) for name, (cls, kw, *_rest) in ARCHS.items()}


def _names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_partition_embeddings_and_head_by_execution_order(arch, arch_dirs):
    _, _, emb, head, stack = ARCHS[arch]
    model, _ = load_model(arch_dirs[arch])
    prefix, layers = find_layers(model)
    assert prefix == stack and len(layers) == 2
    blocks = partition(model, embeddings=True, head=True)
    assert [b.name for b in blocks] == ["embeddings", "layer.0", "layer.1", "head"]
    assert set(blocks[0].param_names) == emb
    assert set(blocks[-1].param_names) == head
    for i in (0, 1):
        assert all(n.startswith(f"{stack}.{i}.") for n in blocks[1 + i].param_names)
    flat = [n for b in blocks for n in b.param_names]
    assert sorted(flat) == sorted(_names(model)) and len(flat) == len(set(flat))
    assert [b.name for b in partition(model)] == ["layer.0", "layer.1"]


def _short_run(model, tokenizer):
    """A few DECA local steps + mixes on the embeddings, a layer and the head block; returns the changed names."""
    ex = [Example("ab", "cd"), Example("hello ", "world"), Example("1+1=", "2"), Example("xyz", "zyx")]
    cfg = TrainConfig(rounds=1, inner_steps=2, batch_size=2, max_len=16, lr=1e-2, embeddings_block=True,
                      head_block=True)
    trainer = PeerTrainer(model, Batcher(ex, tokenizer, cfg.batch_size, 0, cfg.max_len), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for blk in (0, 1, len(trainer.blocks) - 1):
        trainer.activate(blk)
        for _ in range(cfg.inner_steps):
            trainer.local_step()
            trainer.apply_mix([t.clone() for t in trainer.block().values()])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for blk in (0, 1, len(trainer.blocks) - 1):
        assert changed & set(trainer.blocks[blk].param_names), trainer.blocks[blk].name
    return trainer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_sharded_checkpoints_restore_exactly(arch, arch_dirs, tmp_path):
    """A peer's checkpoints (block-sharded, embeddings and head blocks too), the later one rewriting only the trained
    blocks' shards: transformers reads it back and a strict restore gives every tensor back, bit for bit. (Where
    the file's keys are not the model's, e.g. fused MoE experts, every save is a plain full one.)"""
    model, tokenizer = load_model(arch_dirs[arch])
    blocks = [b.param_names for b in partition(model, embeddings=True, head=True)]
    root = tmp_path / "ckpt"
    save_atomic(model, tokenizer, root, "a0", groups=blocks)
    _short_run(model, tokenizer)  # trains the embeddings, layer 0 and the head blocks
    ckpt = save_atomic(model, tokenizer, root, "a1", groups=blocks,
                       changed=set(blocks[0]) | set(blocks[1]) | set(blocks[-1]))
    # the files keep other keys than the model's (embed_out for lm_head; per-expert tensors for the fused ones)
    assert (ckpt / "model.safetensors.index.json").is_file() == (arch not in ("gpt-neox", "mixtral", "qwen2-moe"))
    want = model.state_dict()
    got = T.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    fresh, _ = load_model(arch_dirs[arch])
    restore_weights(fresh, ckpt)
    assert all(torch.equal(t, want[k]) for k, t in fresh.state_dict().items())


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_checkpoint_and_strict_restore(arch, arch_dirs, tmp_path):
    model, tokenizer = load_model(arch_dirs[arch])
    _short_run(model, tokenizer)
    ckpt = save_atomic(model, tokenizer, tmp_path / "ckpt", tag="a00002")

    # (c) transformers reads it back with no missing/unexpected key and equal tensors
    reread, info = T.AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want = model.state_dict()
    got = reread.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    # (d) strict restore into a freshly loaded original model: every parameter and buffer, bit for bit
    fresh, _ = load_model(arch_dirs[arch])
    assert any(not torch.equal(p, want[n]) for n, p in fresh.named_parameters())
    restore_weights(fresh, ckpt)
    restored = fresh.state_dict()
    assert set(restored) == set(want)
    bad = [k for k in want if not torch.equal(restored[k], want[k])]
    assert not bad, bad

    # a removed key or an extra key is an error, not a warning
    keys = sorted(load_file(ckpt / "model.safetensors"))
    dropped = keys[len(keys) // 2]
    missing = _rewrite(ckpt, tmp_path / "missing", lambda t: t.pop(dropped))
    with pytest.raises(CheckpointError, match=f"missing key {dropped}"):
        restore_weights(load_model(arch_dirs[arch])[0], missing)
    extra = _rewrite(ckpt, tmp_path / "extra", lambda t: t.update({"surplus.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected key surplus.weight"):
        restore_weights(fresh, extra)


def test_restore_rejects_reshaped_key_and_lossy_dtype(arch_dirs, tmp_path):
    model, tokenizer = load_model(arch_dirs["llama"])
    ckpt = save_atomic(model, tokenizer, tmp_path / "ckpt", tag="a0")
    key = "model.layers.0.mlp.up_proj.weight"
    reshaped = _rewrite(ckpt, tmp_path / "reshaped", lambda t: t.update({key: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=f"{key} has shape") as err:
        restore_weights(model, reshaped)
    assert "\n" not in str(err.value)
    half, _ = load_model(arch_dirs["llama"], dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="stored as F32"):
        restore_weights(half, ckpt)


def test_restore_rejects_keys_transformers_would_silently_ignore(arch_dirs, tmp_path):
    model, tokenizer = load_model(arch_dirs["gpt2"])
    ckpt = save_atomic(model, tokenizer, tmp_path / "ckpt", tag="a0")
    stale = _rewrite(ckpt, tmp_path / "stale", lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(4, 4)}))
    with pytest.raises(CheckpointError, match="unexpected key transformer.h.0.attn.bias"):
        restore_weights(model, stale)


# -------------------------------------------------------------------------------- refused models

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    cfg = T.BertConfig(**IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       max_position_embeddings=64, architectures=["BertForMaskedLM"])
    return _write(tmp_path_factory.mktemp("bert") / "bert", cfg)


def test_bert_is_not_a_causal_lm(bert_dir):
    with pytest.raises(ModelError, match="not a causal LM") as err:
        load_model(bert_dir)
    assert "\n" not in str(err.value) and "BertLMHeadModel" in str(err.value)


def test_bert_configured_as_decoder_is_causal(tmp_path):
    cfg = T.BertConfig(**IDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       max_position_embeddings=64, is_decoder=True)
    model, _ = load_model(_write(tmp_path / "bert-dec", cfg))
    assert type(model).__name__ == "BertLMHeadModel"


def test_encoder_decoder_is_not_a_causal_lm(tmp_path):
    cfg = T.T5Config(**IDS, d_model=32, d_ff=48, d_kv=16, num_layers=1, num_heads=2, decoder_start_token_id=0)
    path = tmp_path / "t5"
    T.T5ForConditionalGeneration(cfg).save_pretrained(path)
    _build_tokenizer().save_pretrained(path)
    with pytest.raises(ModelError, match="encoder-decoder"):
        load_model(path)


def test_tokenizer_bigger_than_embedding_table(tmp_path):
    cfg = T.LlamaConfig(**dict(IDS, vocab_size=50), **DEC)
    with pytest.raises(ModelError, match=r"101 tokens .* only 50 rows") as err:
        load_model(_write(tmp_path / "small-vocab", cfg))
    assert "\n" not in str(err.value)


def test_cli_refuses_bert_with_one_line(bert_dir):
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", REPO / "topologies" / "ring4.json", "--model", bert_dir),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "not a causal LM" in errors[0], p.stderr[-2000:]
