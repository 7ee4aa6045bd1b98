"""The shipped base model (deca_p2p/base_model): it loads, it is small, it knows the pretraining family and not
the fine-tuning family, and scripts/pretrain_base.py (which made it) runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from conftest import REPO
from deca_p2p import models as M
from deca_p2p import tasks as T
from deca_p2p.evaluation import evaluate

BASE = REPO / "deca_p2p" / "base_model"
MAX_BYTES = 10 * 2**20
EVAL_PER_TASK = 30  # a few dozen fresh examples per task keep the bounds check well under 20 s


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def base():
    return M.load_model(M.ensure_default_model(), dtype=torch.float32)


def _info() -> dict:
    return json.loads((BASE / "pretrain.json").read_text(encoding="utf-8"))


def test_the_default_model_is_the_shipped_base():
    assert M.default_model_path() == M.ensure_default_model() == BASE
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
              "pretrain.json"):
        assert (BASE / f).is_file(), f
    assert (BASE / "model.safetensors").stat().st_size <= MAX_BYTES
    # the package ships it (pip install reads package_data from setup.cfg)
    assert "base_model/*" in (REPO / "setup.cfg").read_text(encoding="utf-8")


def test_hf_auto_classes_and_load_model_read_it(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(BASE, local_files_only=True)
    assert hf.config.model_type == "llama"
    assert {k: getattr(hf.config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                               "vocab_size", "max_position_embeddings")} == \
        {k: M.DEFAULT_MODEL_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                "vocab_size", "max_position_embeddings")}
    n_params = sum(p.numel() for p in hf.parameters())
    assert n_params == _info()["n_params"] and n_params < 3_000_000
    model, tok2 = base
    assert next(model.parameters()).dtype == torch.float32 and model.training
    for (n, p), (_, q) in zip(hf.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    assert len(tok) == len(tok2) == hf.config.vocab_size
    for text in ["rev:abcd=", "add:99+1=", "  a b\tZ~"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and ids == tok2.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # the same character tokenizer as the one build_default_model writes
    assert tok.get_vocab() == M._build_tokenizer().get_vocab()


def test_base_knows_the_pretraining_family_and_not_the_fine_tuning_family(base):
    model, tok = base
    info = _info()
    # Held-out prompts only: pretraining's own training set is regenerated (same sizes and seed) and excluded.
    # Fresh prompts from another seed, plus the first of the prompts pretraining held out (for `inc`, whose
    # 999 prompts its 20000 training examples cover all but the held-out ones, they are the only unseen ones).
    train, held = T.task_dataset(T.PRETRAIN_TASKS, info["train_per_task"], info["eval_per_task"], info["seed"])
    seen = {e.prompt for e in train}
    held = [e for t in T.PRETRAIN_TASKS for e in [x for x in held if x.label == t][:EVAL_PER_TASK // 2]]
    _, fresh = T.task_dataset(T.PRETRAIN_TASKS, 0, EVAL_PER_TASK, seed=info["seed"] + 1000)
    fresh = [e for e in fresh if e.prompt not in seen and e.prompt not in {h.prompt for h in held}]
    pre_eval = held + fresh
    assert not {e.prompt for e in pre_eval} & seen
    assert len(fresh) >= 0.5 * EVAL_PER_TASK * len(T.PRETRAIN_TASKS)
    _, ft_eval = T.default_dataset(0, EVAL_PER_TASK, seed=1)  # not the seed the README reports (0)
    pre = evaluate(model, tok, pre_eval, batch_size=128)
    ft = evaluate(model, tok, ft_eval, batch_size=128)
    pre_acc = {t: pre[f"acc/{t}"] for t in T.PRETRAIN_TASKS}
    ft_acc = {t: ft[f"acc/{t}"] for t in T.TASKS}
    assert pre["acc"] >= 0.9, pre_acc
    assert min(pre_acc.values()) >= 0.8, pre_acc
    assert ft["acc"] <= 0.1, ft_acc
    assert max(ft_acc.values()) <= 0.2, ft_acc
    # what the README and pretrain.json report meets the same bounds
    assert info["acc_pretrain_mean"] >= 0.9 and info["acc_finetune_mean"] <= 0.1
    assert set(info["acc_pretrain"]) == set(T.PRETRAIN_TASKS) and set(info["acc_finetune"]) == set(T.TASKS)
    readme = (BASE / "README.md").read_text(encoding="utf-8")
    assert info["command"] in readme and "scripts/pretrain_base.py" in info["command"]


def test_pretrain_script_quick_writes_a_loadable_model(tmp_path):
    out = tmp_path / "base"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_base.py"), "--quick", "--out", str(out),
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout
    model, tok = M.load_model(out, dtype=torch.float32)
    assert model.config.hidden_size == M.DEFAULT_MODEL_CONFIG["hidden_size"]
    assert len(tok) == model.config.vocab_size
    info = json.loads((out / "pretrain.json").read_text(encoding="utf-8"))
    assert info["steps"] == 6 and set(info["acc_pretrain"]) == set(T.PRETRAIN_TASKS)
    assert (out / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"], "no temporary directory left behind"
