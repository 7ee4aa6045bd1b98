"""Evaluation: held-out loss on exactly what is trained, and exact match of greedy answers.

Memory stays within a training step's: both passes run in batches of ``batch_size`` sequences cut to
``max_len`` tokens (the same encoding and truncation as training, encoding.py), under ``no_grad``.
Greedy decoding goes through ``model.generate`` (its cache handling follows the transformers release).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from .data import Example
from .encoding import IGNORE_INDEX, _render, check_chat_template, collate, encode_examples, encode_texts, \
    keep_newest, pad_id_of, prompt_ids, target_ids
from .models import position_limit


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens of ``batch`` (labels != -100), next-token shifted."""
    device = _model_device(model)
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config names (e.g. a chat end-of-turn token)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen] if isinstance(gen, int) else [])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def _greedy_ids(model, prompts: list[list[int]], max_new: int, eos: list[int], pad_id: int) -> list[list[int]]:
    """Greedy continuation of equal-length prompts as one unpadded batch: per prompt, the new ids up to and
    including the first EOS (if any)."""
    from transformers import GenerationConfig

    device = _model_device(model)
    cur = torch.tensor(prompts, dtype=torch.long, device=device)
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos,
                          pad_token_id=pad_id, use_cache=True)
    seqs = model.generate(input_ids=cur, attention_mask=torch.ones_like(cur), generation_config=gc)
    out = []
    for row in seqs[:, cur.shape[1]:].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos), None)
        out.append(row if cut is None else row[: cut + 1])
    return out


def _greedy_texts(model, tokenizer, prompts: list[list[int]], max_new: list[int], batch_size: int) -> list[tuple[str, bool]]:
    """Decoded greedy answers and whether each stopped with an EOS. Prompts are grouped by length (no padding)."""
    eos = _eos_ids(model, tokenizer)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    result: list[tuple[str, bool]] = [("", False)] * len(prompts)
    for _, idxs in sorted(groups.items()):
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s: s + batch_size]
            gen = _greedy_ids(model, [prompts[i] for i in chunk], max(max_new[i] for i in chunk), eos, pad_id_of(tokenizer))
            for i, ids in zip(chunk, gen):
                stopped = bool(ids) and ids[-1] in eos
                result[i] = (tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True), stopped)
    return result


def greedy_complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 256) -> list[str]:
    """Greedy completions of ``prompts`` (tokenized as ``bos + prompt``), cut at the first EOS."""
    was_training = model.training
    model.eval()
    try:
        texts = _greedy_texts(model, tokenizer, prompt_ids(tokenizer, list(prompts)), [max_new_tokens] * len(prompts),
                              batch_size)
    finally:
        model.train(was_training)
    return [t for t, _ in texts]


def _answer_tasks(tokenizer, examples: Sequence[Example], max_len: int, max_new_tokens: int):
    """Per example with an exact answer (prompt/completion, or a chat ending with an assistant turn):
    (index, prompt ids cut to leave room for the answer, answer text, new-token budget, strict EOS)."""
    pcs = [i for i, e in enumerate(examples) if e.kind == "prompt"]
    chats = [i for i, e in enumerate(examples) if e.kind == "chat" and e.messages[-1][0] == "assistant"]
    tasks = []
    if pcs:
        ps = prompt_ids(tokenizer, [examples[i].prompt for i in pcs])
        ts = target_ids(tokenizer, [examples[i].completion for i in pcs])
        for i, p, t in zip(pcs, ps, ts):
            tasks.append((i, p, examples[i].completion, len(t) - 1 + 2, True))
    if chats:
        check_chat_template(tokenizer, "evaluation data")
        for i in chats:
            msgs = examples[i].messages
            p = encode_texts(tokenizer, [_render(tokenizer, msgs[:-1], generation_prompt=True)])[0]
            answer = msgs[-1][1]
            tasks.append((i, p, answer, len(encode_texts(tokenizer, [answer])[0]) + 2, False))
    out = []
    n_bos = 1 if tokenizer.bos_token_id is not None else 0
    for i, p, answer, budget, strict in tasks:
        if budget > max_new_tokens or budget >= max_len:
            continue  # too long to decode here: scored by the loss only
        room = max_len - budget
        if len(p) > room:  # keep the BOS and the newest prompt tokens, as training does
            p = keep_newest(p, room, n_bos)
        out.append((i, p, answer, budget, strict))
    return out


def evaluate(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_len: int | None = None,
             max_new_tokens: int = 64) -> dict[str, float]:
    """Evaluate on ``examples``.

    ``eval_loss``: token-weighted cross-entropy over the trained tokens (completions + EOS, assistant turns,
    texts), sequences cut to ``max_len`` (default: the model's position limit) exactly as in training.
    ``acc``: exact match of the greedy answer (prompt/completion: the completion followed by EOS; chat: the last
    assistant turn), over the examples whose answer fits in ``max_new_tokens``; ``acc/<label>`` per label;
    ``acc_n`` how many were scored. Runs in eval mode under ``no_grad`` and restores the model's mode.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    max_len = max_len or position_limit(model, tokenizer) or 1024
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        rows, trunc = encode_examples(tokenizer, examples, max_len, "evaluation data")
        order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]))  # similar lengths batch together
        loss_sum, n_tok = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                batch = collate([rows[k] for k in order[s: s + batch_size]], pad_id_of(tokenizer))
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                for r in range(labels.shape[0]):  # row by row: no second copy of the whole batch's logits
                    loss_sum += float(torch.nn.functional.cross_entropy(
                        logits[r, :-1].float(), labels[r], ignore_index=IGNORE_INDEX, reduction="sum"))
                n_tok += int((labels != IGNORE_INDEX).sum())
                del logits
        metrics: dict[str, float] = {"eval_loss": loss_sum / max(n_tok, 1), "eval_tokens": n_tok,
                                     "eval_truncated": trunc.total}
        tasks = _answer_tasks(tokenizer, examples, max_len, max_new_tokens)
        if tasks:
            gens = _greedy_texts(model, tokenizer, [t[1] for t in tasks], [t[3] for t in tasks], batch_size)
            hits: dict[str, list[bool]] = defaultdict(list)
            for (i, _, answer, _, strict), (text, stopped) in zip(tasks, gens):
                ok = (stopped and text == answer) if strict else text.strip() == answer.strip()
                hits[examples[i].label].append(ok)
            metrics["acc"] = float(np.mean([h for v in hits.values() for h in v]))
            metrics["acc_n"] = len(tasks)
            for lab in sorted(hits):
                metrics[f"acc/{lab}"] = float(np.mean(hits[lab]))
        return metrics
    finally:
        model.train(was_training)
