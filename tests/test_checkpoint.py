"""save_atomic's later saves (weights written, the rest linked) give the files save_pretrained gives."""
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deca_p2p.checkpoint import CheckpointError, latest, read_weights, restore_weights, save_atomic
from deca_p2p.models import BASE_MODEL_DIR


def _model(seed: int):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def _files(ckpt):
    return {f.relative_to(ckpt).as_posix(): f.read_bytes() for f in sorted(ckpt.rglob("*")) if f.is_file()}


def test_later_saves_are_the_files_a_full_save_writes(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    m = _model(0)
    root = tmp_path / "peer"
    first = save_atomic(m, tok, root, "a0", extra_files={"state.json": "{}"})
    os.utime(first / "config.json", (1e9, 1e9))  # a link keeps this; a file written again would not
    for k in (1, 2):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.25 * k)
        save_atomic(m, tok, root, f"a{k}", extra_files={"state.json": f'{{"k": {k}}}'})
    ckpt = latest(root)
    assert (ckpt / "config.json").stat().st_mtime == 1e9  # linked, not written again
    assert [p.name for p in root.glob("ckpt-*")] == [ckpt.name]  # the older ones are gone, their links with them
    full = save_atomic(m, tok, tmp_path / "fresh", "x", extra_files={"state.json": '{"k": 2}'})  # a new root: in full
    assert _files(ckpt) == _files(full)
    fresh = _model(1)
    restore_weights(fresh, ckpt)
    for (n, p), (_, q) in zip(fresh.state_dict().items(), m.state_dict().items()):
        assert torch.equal(p, q), n


def test_another_model_in_the_same_root_is_saved_in_full(tmp_path):
    root = tmp_path / "peer"
    a = save_atomic(_model(0), None, root, "a")
    os.utime(a / "config.json", (1e9, 1e9))
    other = _model(1)
    b = save_atomic(other, None, root, "b")
    assert (b / "config.json").stat().st_mtime != 1e9
    fresh = _model(2)
    restore_weights(fresh, b)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), other.parameters()))


def test_a_different_tokenizer_is_saved_in_full(tmp_path):
    m = _model(0)
    root = tmp_path / "peer"
    save_atomic(m, AutoTokenizer.from_pretrained(BASE_MODEL_DIR), root, "a")
    b = save_atomic(m, None, root, "b")  # the tokenizer files must not be linked into this one
    assert not (b / "tokenizer.json").exists()


def test_an_extra_file_never_writes_through_a_link(tmp_path):
    m = _model(0)
    root = tmp_path / "peer"
    first = save_atomic(m, None, root, "a")
    os.link(first / "config.json", tmp_path / "held.json")  # the first checkpoint's file, kept past its deletion
    before = (tmp_path / "held.json").read_bytes()
    b = save_atomic(m, None, root, "b", extra_files={"config.json": "{}"})
    assert (b / "config.json").read_text() == "{}"
    assert (tmp_path / "held.json").read_bytes() == before


def test_no_hard_links_means_full_saves(tmp_path, monkeypatch):
    from deca_p2p import checkpoint

    calls = []

    def no_link(src, dst):  # a file system without hard links
        calls.append(dst)
        raise OSError(18, "Invalid cross-device link")

    m = _model(0)
    root = tmp_path / "peer"
    save_atomic(m, None, root, "a")
    monkeypatch.setattr(checkpoint.os, "link", no_link)
    for k in ("b", "c"):
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        ckpt = save_atomic(m, None, root, k)
    assert len(calls) == 1  # tried once, then saved in full
    assert _files(ckpt) == _files(save_atomic(m, None, tmp_path / "fresh", "x"))


def test_a_changed_tensor_layout_is_saved_in_full(tmp_path):
    m = _model(0)
    root = tmp_path / "peer"
    save_atomic(m, None, root, "a")
    m.to(torch.float16)  # config.json records the dtype: it must be written again
    ckpt = save_atomic(m, None, root, "b")
    assert _files(ckpt) == _files(save_atomic(m, None, tmp_path / "fresh", "x"))


def _layer_groups(m):
    return [tuple(n for n, _ in m.named_parameters() if n.startswith(f"model.layers.{i}.")) for i in (0, 1)]


def _mtimes(ckpt):
    """Of the weight files (the shard index, the same for the same groups, is linked)."""
    return {f.name: f.stat().st_mtime for f in ckpt.glob("model*.safetensors")}


def _age(ckpt):
    """Date CKPT's weight files and index back: a link keeps this; a file written again does not."""
    for f in ckpt.glob("model*.safetensors*"):
        os.utime(f, (1e9, 1e9))


def _restores_exactly(m, ckpt) -> bool:
    fresh = _model(1)
    restore_weights(fresh, ckpt)
    return all(torch.equal(p, q) for p, q in zip(fresh.state_dict().values(), m.state_dict().values()))


def test_block_sharded_saves_rewrite_only_the_shards_that_changed(tmp_path):
    m = _model(0)
    groups = _layer_groups(m)
    root = tmp_path / "peer"
    first = save_atomic(m, None, root, "a", groups=groups)
    shards = sorted(f.name for f in first.glob("model-*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # the rest, layer 0, layer 1
    assert not (first / "model.safetensors").exists() and (first / "model.safetensors.index.json").is_file()
    _age(first)
    with torch.no_grad():
        for n in groups[1]:
            dict(m.named_parameters())[n].add_(0.5)
    ckpt = save_atomic(m, None, root, "b", groups=groups, changed=groups[1])
    assert {n for n, t in _mtimes(ckpt).items() if t != 1e9} == {shards[2]}  # layer 1's shard alone is new
    # the same files a first save into a fresh root writes, which transformers and a strict restore read back
    assert _files(ckpt) == _files(save_atomic(m, None, tmp_path / "fresh", "x", groups=groups))
    reread = LlamaForCausalLM.from_pretrained(ckpt)
    assert all(torch.equal(p, q) for p, q in zip(reread.state_dict().values(), m.state_dict().values()))
    assert _restores_exactly(m, ckpt)
    assert set(read_weights(ckpt)) == set(read_weights(save_atomic(m, None, tmp_path / "single", "y")))


def test_a_tied_weight_changed_under_its_other_name_rewrites_its_shard(tmp_path):
    m = _model(0)  # tie_word_embeddings: the file keeps model.embed_tokens.weight (the rest's shard), not lm_head.weight
    groups = _layer_groups(m)
    root = tmp_path / "peer"
    first = save_atomic(m, None, root, "a", groups=groups)
    _age(first)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    ckpt = save_atomic(m, None, root, "b", groups=groups, changed={"lm_head.weight"})
    assert {n for n, t in _mtimes(ckpt).items() if t != 1e9} == {"model-00001-of-00003.safetensors"}
    assert _restores_exactly(m, ckpt)  # the embeddings (and every other tensor)


def test_unsaid_changes_and_new_groups_mean_every_shard_is_written(tmp_path):
    m = _model(0)
    groups = _layer_groups(m)
    root = tmp_path / "peer"
    for k, (g, changed) in enumerate([(groups, None), (groups, None), (groups[::-1], groups[0]), (None, set())]):
        with torch.no_grad():
            next(m.parameters()).add_(1.0)  # the embeddings: a change no `changed` below names
        if k:
            _age(latest(root))
        ckpt = save_atomic(m, None, root, f"a{k}", groups=g, changed=changed)
        if k:  # changed=None: every shard; other groups or none: a full save
            assert all(t != 1e9 for t in _mtimes(ckpt).values()), k
        assert _restores_exactly(m, ckpt), k


def test_changed_means_nothing_without_groups(tmp_path):
    """One weight file holds every tensor: it is always written again, whatever `changed` names."""
    m = _model(0)
    root = tmp_path / "peer"
    save_atomic(m, None, root, "a", changed=set())
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    ckpt = save_atomic(m, None, root, "b", changed={"no.such.tensor"})
    assert _restores_exactly(m, ckpt)


@pytest.mark.parametrize("shard", [5, None, "../elsewhere.safetensors", "/abs.safetensors", ".hidden.safetensors"])
def test_a_damaged_shard_index_is_a_one_line_error(tmp_path, shard):
    m = _model(0)
    ckpt = save_atomic(m, None, tmp_path / "peer", "a", groups=_layer_groups(m))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unreadable model.safetensors.index.json"):
        restore_weights(_model(1), ckpt)
