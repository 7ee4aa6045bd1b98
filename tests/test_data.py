"""Tests for deca_p2p.data: tasks, JSONL, Dirichlet split, default model, batching, evaluation."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from deca_p2p import data as D
from deca_p2p import models as M
from deca_p2p import tasks as T
from deca_p2p import encoding as E
from deca_p2p import evaluation as V
from deca_p2p.data import DataError, Example
from deca_p2p.models import ModelError


# --------------------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------------------


def solve(prompt: str) -> str:
    """Independent re-implementation of the task answers, from the prompt alone."""
    m = re.fullmatch(r"([a-z]+):(.*)=", prompt)
    assert m, prompt
    op, arg = m.groups()
    if op == "copy":
        return arg
    if op == "rev":
        return arg[::-1]
    if op == "sort":
        return "".join(sorted(arg))
    if op == "up":
        return arg.upper()
    if op == "add":
        a, b = arg.split("+")
        return str(int(a) + int(b))
    if op == "cnt":
        c, w = arg.split(",")
        return str(w.count(c))
    if op == "dedup":
        out = ""
        for ch in arg:
            if ch not in out:
                out += ch
        return out
    if op == "rot":
        return "".join("a" if c == "z" else chr(ord(c) + 1) for c in arg)
    if op == "low":
        return arg.lower()
    if op == "swap":
        return "".join(c.lower() if c.isupper() else c.upper() for c in arg)
    if op == "first":
        return arg[0]
    if op == "last":
        return arg[-1]
    if op == "len":
        return str(len(arg))
    if op == "min":
        return sorted(arg)[0]
    if op == "inc":
        return str(int(arg) + 1)
    raise AssertionError(f"unknown op in {prompt!r}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return M.build_default_model(tmp_path_factory.mktemp("models") / "default", seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    # The model is tiny: one thread is faster than two, and immune to oversubscription when other
    # test processes share the cores. Also makes the training check bit-reproducible.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# tasks and the default dataset
# --------------------------------------------------------------------------------------------------


def test_tasks_and_answers():
    assert len(T.TASKS) >= 6 and {"rev", "sort", "add", "count"} <= set(T.TASKS)
    assert len(T.PRETRAIN_TASKS) >= 5 and {"copy", "upper"} <= set(T.PRETRAIN_TASKS)
    assert T.ALL_TASKS == T.PRETRAIN_TASKS + T.TASKS
    assert len(set(T.ALL_TASKS)) == len(T.ALL_TASKS), "names are unique and the families are disjoint"
    rng = random.Random(0)
    ops = {}
    for task in T.ALL_TASKS:
        exs = T.make_task_examples(task, 200, rng)
        assert len(exs) == 200
        for ex in exs:
            assert ex.label == task
            assert ex.completion == solve(ex.prompt), ex
            assert 0 < len(ex.completion) <= 7
        ops[task] = {ex.prompt.split(":")[0] for ex in exs}
        assert len(ops[task]) == 1, "one prompt name per task"
    # the base model never saw a fine-tuning prompt name: the families share no prompt name either
    assert not set().union(*(ops[t] for t in T.TASKS)) & set().union(*(ops[t] for t in T.PRETRAIN_TASKS))
    assert len(set().union(*ops.values())) == len(T.ALL_TASKS)
    # answers are not trivially guessable from the prompt: few fine-tuning answers equal a copy of the input
    for task in T.TASKS:
        exs = T.make_task_examples(task, 400, random.Random(1))
        same = sum(ex.completion == ex.prompt.split(":", 1)[1][:-1] for ex in exs)
        assert same / len(exs) < 0.1, (task, same)
    with pytest.raises(ValueError):
        T.make_task_examples("nope", 1, rng)
    with pytest.raises(ValueError, match="unknown task"):
        T.task_dataset(["copy", "nope"], 1, 1)


def test_task_dataset_per_family():
    train, ev = T.task_dataset(T.PRETRAIN_TASKS, 50, 10, seed=0)
    assert Counter(e.label for e in train) == {t: 50 for t in T.PRETRAIN_TASKS}
    assert [e.label for e in ev] == [t for t in T.PRETRAIN_TASKS for _ in range(10)], "grouped, family order"
    assert not ({e.prompt for e in ev} & {e.prompt for e in train})
    assert T.task_dataset(T.TASKS, 50, 10, seed=0) == T.default_dataset(50, 10, seed=0)
    # eval sets are drawn first from each task's own stream: the same whatever the train size
    assert T.default_dataset(0, 10, seed=5)[1] == T.default_dataset(300, 10, seed=5)[1]


def test_default_dataset_deterministic_disjoint_correct():
    train, ev = T.default_dataset(n_train_per_task=300, n_eval_per_task=40, seed=3)
    train2, ev2 = T.default_dataset(n_train_per_task=300, n_eval_per_task=40, seed=3)
    assert train == train2 and ev == ev2
    other_train, other_ev = T.default_dataset(n_train_per_task=300, n_eval_per_task=40, seed=4)
    assert other_train != train and other_ev != ev

    assert len(train) == 300 * len(T.TASKS)
    assert len(ev) == 40 * len(T.TASKS)
    assert Counter(e.label for e in ev) == {t: 40 for t in T.TASKS}
    assert Counter(e.label for e in train) == {t: 300 for t in T.TASKS}
    assert len({e.prompt for e in ev}) == len(ev), "eval prompts are unique"
    assert not ({e.prompt for e in ev} & {e.prompt for e in train}), "eval disjoint from train"
    for ex in train + ev:
        assert ex.completion == solve(ex.prompt), ex
    # the default-size dataset is also disjoint
    train, ev = T.default_dataset()
    assert len(train) == 2000 * len(T.TASKS) and len(ev) == 40 * len(T.TASKS)
    assert not ({e.prompt for e in ev} & {e.prompt for e in train})


# --------------------------------------------------------------------------------------------------
# load_jsonl
# --------------------------------------------------------------------------------------------------


def test_load_jsonl_good(tmp_path):
    p = tmp_path / "good.jsonl"
    p.write_text(
        json.dumps({"prompt": "rev:ab=", "completion": "ba", "label": "rev"}) + "\n"
        "\n   \n"
        + json.dumps({"prompt": "hi there ", "completion": " yes, é"}) + "\n",
        encoding="utf-8",
    )
    assert D.load_jsonl(p) == [Example("rev:ab=", "ba", "rev"), Example("hi there ", " yes, é", "default")]
    assert D.load_jsonl(str(p)) == D.load_jsonl(p)


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ('{"prompt": "a", "completion": ', "bad JSON"),
        ('{"prompt": "a"}', "missing 'completion'"),
        ('{"completion": "a"}', "missing 'prompt'"),
        ('{"prompt": "a", "completion": 5}', "'completion' must be a string"),
        ('{"prompt": ["a"], "completion": "b"}', "'prompt' must be a string"),
        ('{"prompt": "a", "completion": "b", "label": 3}', "'label' must be a string"),
        ('["a", "b"]', "expected a JSON object"),
    ],
)
def test_load_jsonl_bad_line(tmp_path, bad_line, why):
    p = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    p.write_text(f"{good}\n\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        D.load_jsonl(p)
    msg = str(info.value)
    assert f"{p}:3:" in msg and why in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_load_jsonl_empty_and_missing(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(p))):
        D.load_jsonl(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        D.load_jsonl(p)
    with pytest.raises(DataError, match="no such file"):
        D.load_jsonl(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------------------------------
# Dirichlet split
# --------------------------------------------------------------------------------------------------


def _labels(n_per_task=400):
    labels = [t for t in T.TASKS for _ in range(n_per_task)]
    random.Random(0).shuffle(labels)
    return labels


def _iid_split(n, n_peers, seed):
    idx = np.random.default_rng(seed).permutation(n)
    return [sorted(p.tolist()) for p in np.array_split(idx, n_peers)]


def _tasks_for_frac(labels, part, frac):
    """How many labels (most frequent first) it takes to cover `frac` of a peer's examples."""
    counts = sorted(Counter(labels[i] for i in part).values(), reverse=True)
    total, acc = sum(counts), 0
    for k, c in enumerate(counts, start=1):
        acc += c
        if acc >= frac * total:
            return k
    return len(counts)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 1.0, 1000.0])
@pytest.mark.parametrize("n_peers", [1, 3, 8])
def test_dirichlet_split_is_a_partition(alpha, n_peers):
    labels = _labels(100)
    for seed in range(3):
        parts = D.dirichlet_split(labels, n_peers, alpha=alpha, seed=seed)
        assert len(parts) == n_peers
        assert all(len(p) > 0 for p in parts)
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(len(labels)))
        assert all(isinstance(i, int) for i in flat)
        assert parts == D.dirichlet_split(labels, n_peers, alpha=alpha, seed=seed)
        if n_peers > 1:
            assert parts != D.dirichlet_split(labels, n_peers, alpha=alpha, seed=seed + 10)


def test_dirichlet_split_is_skewed():
    # Measured over 50 seeds with 6 tasks x 400 and 8 peers at alpha=0.25: skew ~0.51, on average
    # 2.9 tasks make up 90% of a peer's data and 2.15 tasks make up 75% (6 at alpha=1000).
    labels = _labels(400)
    n_peers = 8
    skews, skews_iid, skews_big, top90, top75, top90_big = [], [], [], [], [], []
    for seed in range(10):
        parts = D.dirichlet_split(labels, n_peers, alpha=0.25, seed=seed)
        big = D.dirichlet_split(labels, n_peers, alpha=1000.0, seed=seed)
        skews.append(D.label_skew(labels, parts))
        skews_big.append(D.label_skew(labels, big))
        skews_iid.append(D.label_skew(labels, _iid_split(len(labels), n_peers, seed)))
        top90.extend(_tasks_for_frac(labels, p, 0.9) for p in parts)
        top75.extend(_tasks_for_frac(labels, p, 0.75) for p in parts)
        top90_big.extend(_tasks_for_frac(labels, p, 0.9) for p in big)
    assert np.mean(skews_iid) < 0.1
    assert np.mean(skews_big) < 0.1
    assert np.mean(skews) > 0.4
    assert np.mean(skews) > np.mean(skews_big) + 0.3
    assert np.mean(top75) <= 2.5, top75
    assert np.mean(top90) <= 3.3, top90
    assert np.mean(top90_big) >= 5.0
    assert D.label_skew(labels, [list(range(len(labels)))]) == 0.0


def test_dirichlet_split_small_and_invalid():
    labels = ["a"] * 10 + ["b"] * 10
    parts = D.dirichlet_split(labels, 8, alpha=1.0, seed=0)  # needs redraws to give everyone one
    assert all(parts) and sorted(i for p in parts for i in p) == list(range(20))
    # a redraw does not reuse the next seed's split
    assert D.dirichlet_split(labels, 8, alpha=1.0, seed=0) != D.dirichlet_split(labels, 8, alpha=1.0, seed=1)
    with pytest.raises(ValueError, match="fewer than 1 examples"):
        D.dirichlet_split(labels[:10], 8, alpha=0.01, seed=0, max_tries=5)
    with pytest.raises(ValueError):
        D.dirichlet_split(labels, 21)
    with pytest.raises(ValueError):
        D.dirichlet_split(labels, 0)
    with pytest.raises(ValueError):
        D.dirichlet_split(labels, 2, alpha=0.0)


# --------------------------------------------------------------------------------------------------
# default model
# --------------------------------------------------------------------------------------------------


def test_build_is_deterministic(tmp_path, model_dir):
    a = M.build_default_model(tmp_path / "a", seed=0)
    b = M.build_default_model(tmp_path / "b", seed=7)
    sa, sb, s0 = _state(a), _state(b), _state(model_dir)
    assert sa.keys() == s0.keys()
    assert all(torch.equal(sa[k], s0[k]) for k in sa)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    # no temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # building onto an existing model keeps it
    before = (b / "model.safetensors").read_bytes()
    assert M.build_default_model(b, seed=0) == b
    assert (b / "model.safetensors").read_bytes() == before
    # small on disk
    assert sum(f.stat().st_size for f in a.iterdir()) < 8 * 2**20


def test_build_race_keeps_the_winner(tmp_path, monkeypatch):
    target = tmp_path / "m"
    real_rename = os.rename

    def racing_rename(src, dst):
        # another process finishes first
        monkeypatch.setattr(M.os, "rename", real_rename)
        M.build_default_model(dst, seed=5)
        real_rename(src, dst)  # raises: dst is a non-empty directory

    monkeypatch.setattr(M.os, "rename", racing_rename)
    assert M.build_default_model(target, seed=0) == target
    ref = M.build_default_model(tmp_path / "ref5", seed=5)
    st, sr = _state(target), _state(ref)
    assert all(torch.equal(st[k], sr[k]) for k in st)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "ref5"]


def test_build_onto_a_foreign_directory(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a model directory"):
        M.build_default_model(junk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]
    assert sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


def test_default_model_is_the_packaged_base(tmp_path, monkeypatch):
    base = Path(M.__file__).resolve().parent / "base_model"
    assert M.default_model_path() == M.BASE_MODEL_DIR == base
    monkeypatch.setenv("DECA_CACHE", str(tmp_path / "cache"))  # no longer a place the default model goes
    p = M.ensure_default_model()
    assert p == base and (p / "config.json").is_file()
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert M.ensure_default_model() == p
    assert (p / "model.safetensors").stat().st_mtime_ns == mtime, "nothing is rebuilt"
    assert not (tmp_path / "cache").exists(), "nothing is written at run time"
    # a broken install says so in one line instead of training anything
    monkeypatch.setattr(M, "BASE_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelError, match="packaged base model .* incomplete") as info:
        M.ensure_default_model()
    assert "\n" not in str(info.value) and not (tmp_path / "absent").exists()


def test_hf_auto_classes_load_it(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000
    _, tok2 = M.load_model(model_dir)
    for text in ["rev:abcd=", "a b  c, d+e:=\n\tZ~", "  lead and trail  ", "add:99+1="]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text), "one token per character"
        assert ids == tok2.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok2.decode(ids) == text
    assert tok.unk_token_id not in tok.encode("".join(chr(c) for c in range(32, 127)), add_special_tokens=False)
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]
    for t in (tok, tok2):
        assert None not in (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id)
        assert len({t.bos_token_id, t.eos_token_id, t.pad_token_id, t.unk_token_id}) == 4
        assert t("abc")["input_ids"] == t.encode("abc", add_special_tokens=False), "no automatic BOS"


def test_load_model(model_dir, tmp_path):
    model, tok = M.load_model(model_dir)
    assert model.training
    assert next(model.parameters()).dtype == torch.float32
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.attention_dropout == 0.0
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    m16, _ = M.load_model(model_dir, dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16

    with pytest.raises(ModelError, match="does not exist"):
        M.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        M.load_model(tmp_path / "empty")
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ModelError, match="not a causal LM"):
        M.load_model(tmp_path / "vit")


# --------------------------------------------------------------------------------------------------
# Batcher and loss
# --------------------------------------------------------------------------------------------------


def test_batcher_labels_and_padding(model_dir):
    _, tok = M.load_model(model_dir)
    train, _ = T.default_dataset(n_train_per_task=50, n_eval_per_task=1, seed=0)
    by_prompt = {e.prompt: e.completion for e in train}
    b = E.Batcher(train, tok, batch_size=32, seed=1)
    assert len(b) == len(train)
    saw_padding = False
    for _ in range(5):
        batch = b.next_batch()
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 32
        assert ids.dtype == mask.dtype == labels.dtype == torch.long
        assert mask.sum(1).max() == ids.shape[1], "padded to the longest in the batch"
        for row in range(32):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any(), "right padding"
            saw_padding |= n < ids.shape[1]
            assert ids[row, 0] == tok.bos_token_id and ids[row, n - 1] == tok.eos_token_id
            assert (ids[row, n:] == tok.pad_token_id).all()
            text = tok.decode(ids[row, 1 : n - 1].tolist())
            prompt = text[: text.index("=") + 1]
            assert by_prompt[prompt] == text[len(prompt) :]
            p_len = 1 + len(prompt)  # bos + one token per character
            assert (labels[row, :p_len] == -100).all(), "no loss on the prompt"
            assert torch.equal(labels[row, p_len:n], ids[row, p_len:n]), "loss on completion and EOS"
            assert (labels[row, n:] == -100).all(), "no loss on padding"
    assert saw_padding


def test_batcher_reproducible(model_dir):
    _, tok = M.load_model(model_dir)
    train, _ = T.default_dataset(n_train_per_task=50, n_eval_per_task=1, seed=0)
    a, b, c = (E.Batcher(train, tok, 8, seed=s) for s in (3, 3, 4))
    for _ in range(4):
        ba, bb, bc = a.next_batch(), b.next_batch(), c.next_batch()
        assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert not (ba["input_ids"].shape == bc["input_ids"].shape and torch.equal(ba["input_ids"], bc["input_ids"]))
    state = a.state_dict()
    x = a.next_batch()
    a.load_state_dict(state)
    assert torch.equal(a.next_batch()["input_ids"], x["input_ids"])


def test_batcher_truncates_long_examples(model_dir):
    _, tok = M.load_model(model_dir)
    b = E.Batcher([Example("p" * 100, "abc")], tok, 2, 0, max_len=16)
    batch = b.next_batch()
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, -1] == tok.eos_token_id
    assert (batch["labels"][0] != -100).sum() == 4  # "abc" + EOS kept


def test_completion_loss_ignores_prompt_and_padding(model_dir):
    model, tok = M.load_model(model_dir)
    train, _ = T.default_dataset(n_train_per_task=20, n_eval_per_task=1, seed=0)
    batch = E.Batcher(train, tok, 16, seed=0).next_batch()
    loss = V.completion_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    lb = batch["labels"][:, 1:].reshape(-1)
    keep = lb != -100
    ref = torch.nn.functional.cross_entropy(lg[keep], lb[keep])
    assert torch.allclose(loss, ref, atol=1e-5)
    # untrained: close to log(vocab)
    assert abs(loss.item() - np.log(model.config.vocab_size)) < 0.5
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def test_evaluate_untrained_keys_and_mode(model_dir):
    model, tok = M.load_model(model_dir)
    _, ev = T.default_dataset(n_train_per_task=1, n_eval_per_task=5, seed=0)
    m = V.evaluate(model, tok, ev, batch_size=7)
    assert set(m) == {"eval_loss", "eval_tokens", "eval_truncated", "acc", "acc_n"} | {f"acc/{t}" for t in T.TASKS}
    assert all(isinstance(v, float) for k, v in m.items() if k not in ("eval_tokens", "eval_truncated", "acc_n"))
    assert 0 <= m["acc"] <= 1 and m["eval_loss"] > 3
    assert model.training, "train mode restored"
    model.eval()
    m2 = V.evaluate(model, tok, ev, batch_size=256)
    assert not model.training, "eval mode restored"
    assert m2["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-5)
    assert m2["acc"] == m["acc"]


def test_greedy_matches_generate(model_dir):
    model, tok = M.load_model(model_dir)
    _, ev = T.default_dataset(n_train_per_task=1, n_eval_per_task=2, seed=0)
    prompts = [e.prompt for e in ev]
    ours = V.greedy_complete(model, tok, prompts, max_new_tokens=6, batch_size=3)
    model.eval()
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert got == tok.decode(out, skip_special_tokens=True)


def test_short_training_lowers_loss_and_learns_copy(model_dir):
    model, tok = M.load_model(model_dir)
    train = T.make_task_examples("copy", 1000, random.Random(1))
    ev = T.make_task_examples("copy", 40, random.Random(2))
    before = V.evaluate(model, tok, ev)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batcher = E.Batcher(train, tok, batch_size=16, seed=0)
    # Measured (1 thread): eval_loss 4.56 -> 0.85 and copy exact match 0 -> 0.375 after 200 steps
    # (5 s per 100 steps); lr 3e-3 plateaus at ~2.5 for the first few hundred steps.
    for _ in range(200):
        loss = V.completion_loss(model, batcher.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = V.evaluate(model, tok, ev)
    assert model.training
    assert after["eval_loss"] < before["eval_loss"] - 2.0, (before, after)
    assert after["acc"] >= 0.1 and after["acc/copy"] == after["acc"], after
    assert V.greedy_complete(model, tok, [e.prompt for e in ev], 9).count("") < len(ev)


def test_dirichlet_split_min_size_redraws_until_every_peer_has_a_batch():
    labels = [t for t in "abcdef" for _ in range(60)]
    parts = D.dirichlet_split(labels, 8, alpha=0.1, seed=0, min_size=16)
    assert all(len(p) >= 16 for p in parts) and sorted(i for p in parts for i in p) == list(range(len(labels)))
    with pytest.raises(ValueError, match="16 examples"):
        D.dirichlet_split(labels[:100], 8, alpha=0.1, seed=0, min_size=16)
