"""Default model and data: synthetic tasks, JSONL loading, non-IID splits, batching, evaluation.

Everything here is local: no network access, no hub downloads. The embedded default model is a small
LLaMA-architecture causal LM (random init, seeded) with a character-level tokenizer, written in
Hugging Face format so that ``AutoModelForCausalLM`` / ``AutoTokenizer`` read it like any other model.

Conventions (shared by :class:`Batcher` and :func:`evaluate`):

* a training sequence is ``[bos] + ids(prompt) + ids(completion) + [eos]`` (``bos`` only when the
  tokenizer has one); prompt and completion are tokenized separately, without special tokens;
* the loss is taken on the completion tokens and the final EOS only (labels are -100 on the prompt
  and on padding);
* padding is on the right, to the longest sequence of the batch.

``transformers`` and ``tokenizers`` are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "DataError",
    "Example",
    "TASKS",
    "make_task_examples",
    "default_dataset",
    "load_jsonl",
    "dirichlet_split",
    "label_skew",
    "Batcher",
    "completion_loss",
    "greedy_complete",
    "evaluate",
]

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad training/evaluation data; the message is one line naming the file and line."""



@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    label: str = "default"


# --------------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COUNT_ALPHABET = "abcde"  # small alphabet so that counts are non-trivial
_MIN_LEN, _MAX_LEN = 3, 7

TASKS: tuple[str, ...] = ("copy", "rev", "sort", "upper", "add", "count")
"""Task names; each is also the label of its examples. Prompt formats:

* ``copy``:  ``"copy:hello="``  -> ``"hello"``
* ``rev``:   ``"rev:abcd="``    -> ``"dcba"``
* ``sort``:  ``"sort:dbca="``   -> ``"abcd"``
* ``upper``: ``"up:abc="``      -> ``"ABC"``
* ``add``:   ``"add:12+34="``   -> ``"46"``   (operands 0..99)
* ``count``: ``"cnt:a,abaca="`` -> ``"3"``    (occurrences of a letter in a string over a..e)
"""


def _rand_word(rng: random.Random, alphabet: str = _LETTERS) -> str:
    n = rng.randint(_MIN_LEN, _MAX_LEN)
    return "".join(rng.choice(alphabet) for _ in range(n))


def _make_one(task: str, rng: random.Random) -> Example:
    if task == "copy":
        w = _rand_word(rng)
        return Example(f"copy:{w}=", w, task)
    if task == "rev":
        w = _rand_word(rng)
        return Example(f"rev:{w}=", w[::-1], task)
    if task == "sort":
        w = _rand_word(rng)
        return Example(f"sort:{w}=", "".join(sorted(w)), task)
    if task == "upper":
        w = _rand_word(rng)
        return Example(f"up:{w}=", w.upper(), task)
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Example(f"add:{a}+{b}=", str(a + b), task)
    if task == "count":
        c = rng.choice(_COUNT_ALPHABET)
        w = _rand_word(rng, _COUNT_ALPHABET)
        return Example(f"cnt:{c},{w}=", str(w.count(c)), task)
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def make_task_examples(task: str, n: int, rng: random.Random) -> list[Example]:
    """``n`` random examples of ``task`` (duplicates possible), drawn from ``rng``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_make_one(task, rng) for _ in range(n)]


def default_dataset(
    n_train_per_task: int = 2000, n_eval_per_task: int = 40, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Generated (train, eval) over all :data:`TASKS`, deterministic for ``seed``.

    Eval prompts are unique and never occur in train. Train is shuffled (seeded); eval is grouped
    by task, in :data:`TASKS` order.
    """
    train: list[Example] = []
    evals: list[Example] = []
    for task in TASKS:
        # str seeds are hashed with SHA-512 by `random`: stable across processes and runs.
        rng = random.Random(f"deca-p2p/{seed}/{task}")
        seen: set[str] = set()
        tries = 0
        while len(seen) < n_eval_per_task:
            ex = _make_one(task, rng)
            tries += 1
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                evals.append(ex)
            elif tries > 100 * (n_eval_per_task + 10):
                raise ValueError(f"cannot draw {n_eval_per_task} distinct eval prompts for {task!r}")
        tries = 0
        count = 0
        while count < n_train_per_task:
            ex = _make_one(task, rng)
            tries += 1
            if ex.prompt in seen:
                if tries > 100 * (n_train_per_task + 10):
                    raise ValueError(f"cannot draw {n_train_per_task} train examples for {task!r}")
                continue
            train.append(ex)
            count += 1
    random.Random(f"deca-p2p/{seed}/shuffle").shuffle(train)
    return train, evals


# --------------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read ``{"prompt": str, "completion": str, "label"?: str}`` lines; blank lines are skipped.

    A missing ``label`` becomes ``"default"``. Raises :class:`DataError` ("<file>:<line>: <why>")
    for unreadable files, bad JSON, a non-object line, a missing or non-string field, or a file
    with no examples.
    """
    name = str(path)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from None
    out: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        fields = {}
        for key, required in (("prompt", True), ("completion", True), ("label", False)):
            if key not in obj:
                if required:
                    raise DataError(f"{name}:{lineno}: missing {key!r}")
                fields[key] = "default"
                continue
            val = obj[key]
            if not isinstance(val, str):
                raise DataError(f"{name}:{lineno}: {key!r} must be a string, got {type(val).__name__}")
            fields[key] = val
        out.append(Example(fields["prompt"], fields["completion"], fields["label"]))
    if not out:
        raise DataError(f"{name}: no examples (empty file)")
    return out


# --------------------------------------------------------------------------------------------------
# Non-IID partitioning
# --------------------------------------------------------------------------------------------------


def dirichlet_split(
    labels: Sequence[str], n_peers: int, alpha: float = 0.25, seed: int = 0, max_tries: int = 1000
) -> list[list[int]]:
    """Split example indices over ``n_peers`` with label skew (Dirichlet(alpha) per label).

    For each label (in sorted order) the proportions over peers are drawn from
    ``Dirichlet(alpha * ones(n_peers))`` and that label's shuffled indices are cut accordingly.
    Every index appears exactly once overall; every peer gets at least one example (if a draw
    leaves a peer empty, the split is redrawn from the seed sequence ``(seed, 1)``, ``(seed, 2)``,
    ...: deterministic, and never the split of another seed). Small ``alpha``
    means strong skew; large ``alpha`` approaches an IID split. Each peer's indices are sorted.
    """
    n = len(labels)
    if n_peers < 1:
        raise ValueError(f"n_peers must be >= 1, got {n_peers}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    if n < n_peers:
        raise ValueError(f"cannot give each of {n_peers} peers an example: only {n} examples")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    for attempt in range(max_tries):
        rng = np.random.default_rng(seed if attempt == 0 else (seed, attempt))
        parts: list[list[int]] = [[] for _ in range(n_peers)]
        for lab in sorted(by_label):
            idx = np.array(by_label[lab], dtype=np.int64)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_peers, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for peer, chunk in enumerate(np.split(idx, cuts)):
                parts[peer].extend(chunk.tolist())
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(
        f"dirichlet_split: some peer stayed empty after {max_tries} draws "
        f"({n} examples, {n_peers} peers, alpha={alpha}); use more data, fewer peers or a larger alpha"
    )


def label_skew(labels: Sequence[str], parts: Sequence[Sequence[int]]) -> float:
    """Mean total-variation distance between each peer's label distribution and the global one.

    0 means every peer sees the global mix (IID); values near 1 mean peers see disjoint labels.
    Empty peers are ignored.
    """
    total = Counter(labels)
    n = sum(total.values())
    if n == 0:
        return 0.0
    glob = {k: v / n for k, v in total.items()}
    dists = []
    for part in parts:
        if not part:
            continue
        c = Counter(labels[i] for i in part)
        m = len(part)
        dists.append(0.5 * sum(abs(c.get(k, 0) / m - q) for k, q in glob.items()))
    return float(np.mean(dists)) if dists else 0.0


# --------------------------------------------------------------------------------------------------
# Tokenization, batching, loss
# --------------------------------------------------------------------------------------------------


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    return [head + ids for ids in _encode_texts(tokenizer, prompts)]


def _target_ids(tokenizer, completions: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in _encode_texts(tokenizer, completions)]


def _fit(prompt: list[int], target: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a (prompt, target) pair to ``max_len`` tokens: drop the oldest prompt tokens first (the
    BOS, when present, is not kept), then the end of the target."""
    if len(prompt) + len(target) <= max_len:
        return prompt, target
    keep_prompt = max(1, max_len - len(target))
    prompt = prompt[-keep_prompt:]
    target = target[: max_len - len(prompt)]
    return prompt, target


def _collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) + len(t) for p, t in pairs)
    b = len(pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        n = len(p) + len(t)
        input_ids[row, :n] = torch.tensor(p + t, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(t, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Batcher:
    """Tokenized training examples of one peer; samples minibatches reproducibly.

    Minibatches are drawn uniformly with replacement by a ``torch.Generator`` seeded with ``seed``,
    so two processes with the same examples and seed draw identical batches. Each sequence is
    ``bos + prompt + completion + eos``; labels are -100 on the prompt and on the right padding.
    """

    def __init__(self, examples: Sequence[Example], tokenizer, batch_size: int, seed: int, max_len: int = 64):
        if not examples:
            raise ValueError("Batcher needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.max_len = int(max_len)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = _prompt_ids(tokenizer, [e.prompt for e in examples])
        targets = _target_ids(tokenizer, [e.completion for e in examples])
        self.pairs = [_fit(p, t, self.max_len) for p, t in zip(prompts, targets)]
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.pairs), (self.batch_size,), generator=self.generator)
        return _collate([self.pairs[i] for i in idx.tolist()], self.pad_id)

    def state_dict(self) -> dict:
        """Sampler state, for checkpointing."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of ``batch`` (labels != -100), next-token shifted."""
    device = _model_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch).loss


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _greedy_ids(model, prompt_ids: list[list[int]], max_new: int, eos_id: int) -> list[list[int]]:
    """Greedy continuation (with KV cache) of equal-length prompts, as one unpadded batch.
    Returns, per prompt, the generated ids up to and including the first EOS (if any)."""
    device = _model_device(model)
    cur = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    b = cur.shape[0]
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    past = None
    for _ in range(max_new):
        res = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1, :].argmax(dim=-1)
        for i, (tok, d) in enumerate(zip(nxt.tolist(), done.tolist())):
            if not d:
                out[i].append(tok)
        done |= nxt == eos_id
        if bool(done.all()):
            break
        cur = nxt[:, None]
    return out


def greedy_complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 256) -> list[str]:
    """Greedy completions of ``prompts`` (prompt tokenized as ``bos + prompt``), cut at the first EOS.
    Prompts are grouped by token length so that no padding is needed. Leaves the model's mode as is."""
    texts = _greedy_texts(model, tokenizer, _prompt_ids(tokenizer, list(prompts)), [max_new_tokens] * len(prompts), batch_size)
    return [t for t, _ in texts]


def _greedy_texts(model, tokenizer, prompts: list[list[int]], max_new: list[int], batch_size: int) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token_id
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    result: list[tuple[str, bool]] = [("", False)] * len(prompts)
    for _, idxs in sorted(groups.items()):
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            gen = _greedy_ids(model, [prompts[i] for i in chunk], max(max_new[i] for i in chunk), eos)
            for i, ids in zip(chunk, gen):
                stopped = bool(ids) and ids[-1] == eos
                if stopped:
                    ids = ids[:-1]
                result[i] = (tokenizer.decode(ids, skip_special_tokens=True), stopped)
    return result


def evaluate(model, tokenizer, examples: Sequence[Example], batch_size: int = 256) -> dict[str, float]:
    """Evaluate on ``examples``.

    Returns ``eval_loss`` (mean cross-entropy over all completion tokens and their EOS, as trained),
    ``acc`` (exact match of the greedy completion, which must end with EOS within
    ``len(completion tokens) + 2`` new tokens) and ``acc/<label>`` per label.
    Runs in eval mode under ``torch.no_grad()`` and restores the model's mode afterwards.
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    was_training = model.training
    model.eval()
    try:
        device = _model_device(model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = _prompt_ids(tokenizer, [e.prompt for e in examples])
        targets = _target_ids(tokenizer, [e.completion for e in examples])

        # Loss: token-weighted mean over completion tokens (+ EOS), right-padded batches.
        loss_sum, n_tok = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                batch = _collate(list(zip(prompts[s : s + batch_size], targets[s : s + batch_size])), pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits[:, :-1, :].float()
                labels = batch["labels"][:, 1:]
                loss_sum += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                        ignore_index=IGNORE_INDEX, reduction="sum",
                    )
                )
                n_tok += int((labels != IGNORE_INDEX).sum())

        # Exact match by greedy decoding; target length excludes the EOS.
        max_new = [len(t) - 1 + 2 for t in targets]
        gens = _greedy_texts(model, tokenizer, prompts, max_new, batch_size)
        hits: dict[str, list[bool]] = defaultdict(list)
        for ex, (text, stopped) in zip(examples, gens):
            hits[ex.label].append(stopped and text == ex.completion)
        metrics: dict[str, float] = {
            "eval_loss": loss_sum / max(n_tok, 1),
            "acc": float(np.mean([h for v in hits.values() for h in v])),
        }
        for lab in sorted(hits):
            metrics[f"acc/{lab}"] = float(np.mean(hits[lab]))
        return metrics
    finally:
        model.train(was_training)
