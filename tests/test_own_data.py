"""Each peer's data is its own: real `deca-peer start` processes, each given only its own files; long records on a
model with a fixed position table; chat records; `deca-peer split`."""
import json
import os
import random
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.data import load_jsonl
from deca_p2p.metrics import records
from deca_p2p.tasks import TASKS, make_task_examples

pytestmark = pytest.mark.integration

FAST = ["--rounds", "1", "--inner-steps", "2", "--batch-size", "8", "--threads", "1", "--seed", "2"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def _write(path, examples):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_record()) + "\n" for e in examples))
    return path


def _task_records(n, seed, tasks=TASKS):
    rng = random.Random(seed)
    return [ex for k in range(n) for ex in make_task_examples(tasks[k % len(tasks)], 1, rng)]


def test_four_owners_train_on_all_and_only_their_own_records(deca_cache, tmp_path):
    sizes, eval_sizes = {0: 60, 1: 45, 2: 30, 3: 75}, {0: 10, 1: 7, 2: 5, 3: 12}
    base = free_base_port(4)
    procs = {}
    for i, n in sizes.items():
        home = tmp_path / f"owner-{i}"  # each owner's own directory: nothing else is there
        train = _write(home / "mine.jsonl", _task_records(n, seed=i))
        ev = _write(home / "mine-eval.jsonl", _task_records(eval_sizes[i], seed=100 + i))
        procs[i] = subprocess.Popen(
            deca_peer_cmd("start", "--id", i, "--neighbors", REPO / "topologies" / "ring4.json", "--run-dir",
                          home / "run", "--base-port", base, "--data", train, "--eval-data", ev, *FAST),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=home)
    outs = {i: p.communicate(timeout=300)[0].decode(errors="replace") for i, p in procs.items()}
    assert {i: p.returncode for i, p in procs.items()} == {i: 0 for i in sizes}, outs
    for i, n in sizes.items():
        home = tmp_path / f"owner-{i}"
        start = records(home / "run", i, "start")[0]
        assert start["train_examples"] == n, "all of its file trains"
        assert start["eval_examples"] == eval_sizes[i], "evaluated on its own held-out file"
        assert start["train_source"].startswith(str(home / "mine.jsonl")) and start["eval_source"] == str(home / "mine-eval.jsonl")
        assert sum(start["labels"].values()) == n
        assert records(home / "run", i, "final"), "it finished and evaluated"
        assert f"training on {home / 'mine.jsonl'}" in outs[i]


def test_without_eval_file_a_share_is_held_out_and_too_few_records_fail(deca_cache, tmp_path):
    train = _write(tmp_path / "mine.jsonl", _task_records(40, seed=0))
    base = free_base_port(4)
    # peer 0 alone: the hello barrier fails after the data is read, which is all this test needs
    p = subprocess.run(deca_peer_cmd("start", "--id", 0, "--neighbors", REPO / "topologies" / "ring4.json",
                                     "--run-dir", tmp_path / "run", "--base-port", base, "--data", train,
                                     "--hello-timeout", 1, *FAST),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    start = records(tmp_path / "run", 0, "start")[0]
    assert start["train_examples"] + start["eval_examples"] == 40 and 4 <= start["eval_examples"] <= 6  # a tenth per label
    assert "held out" in start["eval_source"] and "held out" in p.stdout
    few = _write(tmp_path / "few.jsonl", _task_records(5, seed=0))
    p = subprocess.run(deca_peer_cmd("start", "--id", 0, "--neighbors", REPO / "topologies" / "ring4.json",
                                     "--run-dir", tmp_path / "run2", "--base-port", base, "--data", few,
                                     "--eval-data", few, *FAST),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"error: peer 0: 5 training examples in {few} (all 5 records), "
                                                 "fewer than one batch (--batch-size 8)")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with a 128-position table and the embedded character tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from deca_p2p.models import _build_tokenizer

    d = tmp_path_factory.mktemp("gpt2")
    tok = _build_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_long_records_on_a_128_position_gpt2(deca_cache, gpt2_dir, tmp_path):
    rng = random.Random(0)
    recs = [{"prompt": "".join(rng.choice("abcdef") for _ in range(rng.randint(150, 700))) + "=",
             "completion": "x" * rng.randint(1, 5), "label": "long"} for _ in range(80)]
    recs += [{"prompt": "ab=", "completion": "y" * 300, "label": "long"}]  # the completion alone does not fit
    recs += [{"text": "z" * 500, "label": "long"}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", REPO / "topologies" / "ring4.json", "--model", gpt2_dir,
                                     "--data", data, "--run-dir", tmp_path / "run", "--set", "embeddings_block=false",
                                     "--set", "eval_fraction=0.25", "--alpha", "100", *FAST),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    starts = [records(tmp_path / "run", i, "start")[0] for i in range(4)]
    assert all(s["max_len"] == 128 for s in starts), "max_len comes from the model's position table"
    assert sum(s["truncated"]["truncated_prompt"] for s in starts) > 0
    assert "longer than max_len 128" in p.stderr
    final = records(tmp_path / "run", 0, "final")[0]
    assert final["eval_truncated"] > 0 and final["eval_loss"] > 0


@pytest.fixture(scope="module")
def chat_model_dir(deca_cache, tmp_path_factory):
    """The embedded model with a chat template on its tokenizer."""
    import shutil

    from deca_p2p.models import default_model_path

    d = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(default_model_path(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
                            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}a:{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_chat_records_train_end_to_end(chat_model_dir, tmp_path):
    recs = []
    for ex in _task_records(120, seed=3):
        recs.append({"messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": ex.prompt},
                                  {"role": "assistant", "content": ex.completion}], "label": ex.label})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "split"
    p = subprocess.run(deca_peer_cmd("split", data, "--peers", 4, "--alpha", 0.5, "--out", out), capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    shards = [load_jsonl(out / f"peer-{i}.jsonl") for i in range(4)]
    held = load_jsonl(out / "eval.jsonl")
    assert sum(map(len, shards)) + len(held) == len(recs) and held
    assert all(e.kind == "chat" for s in shards for e in s)
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", REPO / "topologies" / "ring4.json", "--model",
                                     chat_model_dir, "--data-dir", out, "--run-dir", tmp_path / "run", *FAST),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for i in range(4):
        start = records(tmp_path / "run", i, "start")[0]
        assert start["train_examples"] == len(shards[i])
        final = records(tmp_path / "run", i, "final")[0]
        assert final["acc_n"] == len(held) and final["eval_loss"] > 0
