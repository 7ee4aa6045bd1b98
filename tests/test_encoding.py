"""Record formats, truncation and label masks (encoding.py), and evaluation under --max-len (evaluation.py)."""
from __future__ import annotations

import json

import pytest
import torch

from deca_p2p import data as D
from deca_p2p.data import DataError, Example
from deca_p2p.encoding import IGNORE_INDEX, Batcher, encode_examples
from deca_p2p.evaluation import evaluate
from deca_p2p.models import _build_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return _build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = _build_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def test_load_jsonl_three_formats(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "completion": "b", "label": "x"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"text": "plain words", "label": "lm"},
    ]) + "\n")
    a, b, c = D.load_jsonl(p)
    assert (a.kind, b.kind, c.kind) == ("prompt", "chat", "text")
    assert b.messages == (("user", "hi"), ("assistant", "yo")) and b.label == "default"
    assert c.text == "plain words" and c.label == "lm"
    out = D.write_jsonl(tmp_path / "copy.jsonl", [a, b, c])
    assert D.load_jsonl(out) == [a, b, c], "records survive a write/read round trip"


@pytest.mark.parametrize("record, why", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ({"messages": [{"role": "user"}]}, "missing 'content'"),
    ({"messages": ["hi"]}, "object with 'role'"),
    ({"text": 3}, "'text' must be a string"),
    ({"foo": "bar"}, "expected 'prompt' and 'completion'"),
])
def test_load_jsonl_bad_records(tmp_path, record, why):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=why) as e:
        D.load_jsonl(p)
    assert str(e.value).startswith(f"{p}:1:") and "\n" not in str(e.value)


def test_prompt_truncated_from_the_left_keeps_bos_and_eos(tok):
    ex = [Example("p" * 50 + "END=", "abc"), Example("q", "r")]
    rows, tr = encode_examples(tok, ex, max_len=12)
    ids, labels = rows[0]
    assert len(ids) == 12
    assert ids[0] == tok.bos_token_id, "the BOS stays"
    assert ids[-1] == tok.eos_token_id, "the completion keeps its EOS"
    assert tok.decode(ids[1:-1]).endswith("END=abc")
    assert [t for t in labels if t != IGNORE_INDEX] == ids[-4:]
    assert (tr.prompt, tr.completion, tr.longest) == (1, 0, 1 + 54 + 3 + 1)
    assert rows[1] == ([tok.bos_token_id] + tok.encode("qr", add_special_tokens=False) + [tok.eos_token_id],
                       [IGNORE_INDEX, IGNORE_INDEX] + tok.encode("r", add_special_tokens=False) + [tok.eos_token_id])


def test_completion_too_long_is_cut_and_counted(tok):
    rows, tr = encode_examples(tok, [Example("p", "x" * 20)], max_len=8)
    ids, labels = rows[0]
    assert len(ids) == 8 and ids[-1] != tok.eos_token_id
    assert (tr.prompt, tr.completion) == (0, 1)


def test_text_records_train_every_token(tok):
    rows, tr = encode_examples(tok, [Example(text="hello"), Example(text="z" * 40)], max_len=10)
    ids, labels = rows[0]
    assert ids == [tok.bos_token_id] + tok.encode("hello", add_special_tokens=False) + [tok.eos_token_id]
    assert labels == ids
    assert len(rows[1][0]) == 10 and tr.completion == 1


def test_chat_loss_on_assistant_turns_only_and_single_bos(chat_tok):
    msgs = (("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "again"), ("assistant", "ok!"))
    (ids, labels), = encode_examples(chat_tok, [Example(messages=msgs)], max_len=200)[0]
    assert ids[0] == chat_tok.bos_token_id and ids[1] != chat_tok.bos_token_id, "the template's BOS, not a second one"
    assert ids.count(chat_tok.bos_token_id) == 1
    trained = [k for k, t in enumerate(labels) if t != IGNORE_INDEX]
    assert all(labels[k] == ids[k] for k in trained)
    # the trained tokens are exactly the two replies, each with its end-of-turn (EOS) and the newline after it
    pieces, run = [], []
    for k in range(len(ids)):
        if labels[k] != IGNORE_INDEX:
            run.append(ids[k])
        elif run:
            pieces.append(run)
            run = []
    if run:
        pieces.append(run)
    assert [chat_tok.decode(p) for p in pieces] == ["yo</s>\n", "ok!</s>\n"]
    text = chat_tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert "be brief" in text and "again" in text and "yo" not in text


def test_chat_needs_a_template(tok):
    with pytest.raises(DataError, match="no chat template"):
        encode_examples(tok, [Example(messages=(("user", "a"), ("assistant", "b")))], max_len=64, where="f.jsonl")


def test_chat_truncation_keeps_the_newest_tokens(chat_tok):
    msgs = (("user", "x" * 100), ("assistant", "done"))
    rows, tr = encode_examples(chat_tok, [Example(messages=msgs)], max_len=20)
    (ids, labels), = rows
    assert len(ids) == 20 and ids[-2] == chat_tok.eos_token_id, "the reply keeps its end"
    assert tr.prompt == 1 and tr.completion == 0


def test_batcher_counts_truncation(tok):
    b = Batcher([Example("p" * 100, "abc"), Example("a", "b")], tok, 2, 0, max_len=16)
    assert b.truncation.total == 1 and b.truncation.longest == 1 + 100 + 4
    batch = b.next_batch()
    assert batch["input_ids"].shape[1] <= 16


def test_evaluate_respects_max_len_on_a_fixed_position_table(tmp_path, tok):
    """GPT-2 has a position table: unbounded evaluation would index past it (IndexError)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    ex = [Example("p" * 200, "answer"), Example("q" * 5, "a" * 100), Example("r", "s"), Example(text="t" * 300)]
    m = evaluate(model, tok, ex, batch_size=2, max_len=32, max_new_tokens=8)
    assert m["eval_truncated"] == 3
    assert m["acc_n"] == 2, "answers longer than the decoding budget are scored by the loss only"
    assert m["eval_loss"] > 0 and m["eval_tokens"] > 0


def test_evaluate_chat_scores_the_last_reply(chat_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                                         bos_token_id=chat_tok.bos_token_id, eos_token_id=chat_tok.eos_token_id))
    ex = [Example(messages=(("user", "hi"), ("assistant", "yo")), label="greet")]
    m = evaluate(model, chat_tok, ex, batch_size=4, max_len=64)
    assert m["acc_n"] == 1 and "acc/greet" in m
