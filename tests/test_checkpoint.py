"""save_atomic's later saves (weights written, the rest linked) give the files save_pretrained gives."""
import os

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deca_p2p.checkpoint import latest, restore_weights, save_atomic
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
