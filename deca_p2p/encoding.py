"""Examples to token ids and loss masks, with truncation that is never silent; minibatches.

One encoded example is ``(ids, labels)``: ``labels[k]`` is ``ids[k]`` where the model is trained to predict
that token and ``-100`` elsewhere. By record format (data.Example):

* prompt/completion: ``[bos] + ids(prompt) + ids(completion) + [eos]``, prompt and completion tokenized
  separately without special tokens (``bos`` only when the tokenizer has one); loss on completion and EOS;
* chat (``messages``): the tokenizer's own chat template renders the conversation as text, which is then
  tokenized *without* special tokens (a template that writes its BOS is not given a second one); loss on
  the assistant turns only (their content and the end-of-turn text the template writes after it);
* text: ``[bos] + ids(text) + [eos]``, loss on every token (plain language modelling).

Truncation to ``max_len`` tokens: a prompt/completion pair loses the oldest prompt tokens first (the BOS
stays), so the completion keeps its EOS; only a completion that alone does not fit is cut at its end. A
chat loses its oldest tokens first (the last assistant turn keeps its end), a text its end. Every cut is
counted (:class:`Truncation`), and the peer logs the counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .data import DataError, Example

IGNORE_INDEX = -100


@dataclass
class Truncation:
    """How many examples lost tokens, by where the cut fell."""

    prompt: int = 0        # oldest prompt / conversation tokens dropped; the trained part kept whole
    completion: int = 0    # the trained part itself was cut (its EOS or end-of-turn lost)
    longest: int = 0       # the longest example before truncation, in tokens

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def describe(self, n_examples: int, max_len: int) -> str:
        return (f"{self.total} of {n_examples} training examples are longer than max_len {max_len} (longest "
                f"{self.longest} tokens): {self.prompt} lost their oldest prompt tokens, {self.completion} the end of "
                "their completion (raise --max-len to keep more)")

    def as_dict(self) -> dict[str, int]:
        return {"truncated_prompt": self.prompt, "truncated_completion": self.completion, "longest_tokens": self.longest}


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: lengths beyond the model's limit are expected here, and cut (and counted) by the caller
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    head = _bos(tokenizer)
    return [head + ids for ids in encode_texts(tokenizer, prompts)]


def target_ids(tokenizer, completions: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in encode_texts(tokenizer, completions)]


def keep_newest(prompt: list[int], room: int, n_bos: int) -> list[int]:
    """The newest `room` tokens of a prompt; its BOS stays when there is room for more than the BOS."""
    keep_bos = n_bos if room > n_bos else 0
    return prompt[:keep_bos] + prompt[len(prompt) - (room - keep_bos):]


def fit_pair(prompt: list[int], target: list[int], max_len: int, n_bos: int, tr: Truncation) -> tuple[list[int], list[int]]:
    """Cut (prompt, target) to max_len: oldest prompt tokens first (keeping the BOS), then the target's end."""
    tr.longest = max(tr.longest, len(prompt) + len(target))
    if len(prompt) + len(target) <= max_len:
        return prompt, target
    room = max_len - len(target)
    if room >= 1:
        tr.prompt += 1
        return keep_newest(prompt, room, n_bos), target
    tr.completion += 1
    return prompt[-1:], target[: max_len - 1]


# --------------------------------------------------------------------------------------------------
# Chat records
# --------------------------------------------------------------------------------------------------


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where} holds chat records ('messages') but the model's tokenizer has no chat template; "
                        "use a model with one, or write the records as prompt/completion")


def chat_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the conversation before it (with the generation prompt, i.e. the
    assistant header) to the end of the conversation including it, so it covers the reply and the
    end-of-turn text the template writes; templates whose renderings are not prefixes of each other fall
    back to the reply's own text.
    """
    full = _render(tokenizer, messages)
    spans, pos = [], 0
    for k, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:k], generation_prompt=True) if k else ""
        upto = _render(tokenizer, messages[: k + 1])
        if full.startswith(upto) and upto.startswith(before) and len(before) >= pos:
            start, end = len(before), len(upto)
        else:
            start = full.find(content, pos)
            if start < 0:
                continue
            end = start + len(content)
        spans.append((start, end))
        pos = end
    return full, spans


def encode_chat(tokenizer, messages) -> tuple[list[int], list[int]]:
    text, spans = chat_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
                  for t, (a, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    ids, labels, pos = [], [], 0  # slow tokenizers: tokenize the pieces between span edges
    for s, e in spans:
        for piece, trained in ((text[pos:s], False), (text[s:e], True)):
            piece_ids = encode_texts(tokenizer, [piece])[0] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        pos = e
    tail = encode_texts(tokenizer, [text[pos:]])[0] if text[pos:] else []
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def _fit_tail(ids: list[int], labels: list[int], max_len: int, tr: Truncation) -> tuple[list[int], list[int]]:
    """Keep the newest max_len tokens; it counts as cutting the trained part if a trained token is lost."""
    tr.longest = max(tr.longest, len(ids))
    if len(ids) <= max_len:
        return ids, labels
    cut = len(ids) - max_len
    if all(x == IGNORE_INDEX for x in labels[:cut]):
        tr.prompt += 1
    else:
        tr.completion += 1
    return ids[cut:], labels[cut:]


# --------------------------------------------------------------------------------------------------
# All formats
# --------------------------------------------------------------------------------------------------


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int, where: str = "data"
                    ) -> tuple[list[tuple[list[int], list[int]]], Truncation]:
    """(ids, labels) per example, cut to max_len, and the truncation counts."""
    tr = Truncation()
    out: list[tuple[list[int], list[int]] | None] = [None] * len(examples)
    pc = [i for i, e in enumerate(examples) if e.kind == "prompt"]
    n_bos = len(_bos(tokenizer))
    if pc:
        prompts = prompt_ids(tokenizer, [examples[i].prompt for i in pc])
        targets = target_ids(tokenizer, [examples[i].completion for i in pc])
        for i, p, t in zip(pc, prompts, targets):
            p, t = fit_pair(p, t, max_len, n_bos, tr)
            out[i] = (p + t, [IGNORE_INDEX] * len(p) + t)
    texts = [i for i, e in enumerate(examples) if e.kind == "text"]
    if texts:
        for i, ids in zip(texts, encode_texts(tokenizer, [examples[i].text for i in texts])):
            ids = _bos(tokenizer) + ids + [tokenizer.eos_token_id]
            tr.longest = max(tr.longest, len(ids))
            if len(ids) > max_len:
                tr.completion += 1
                ids = ids[:max_len]
            out[i] = (ids, list(ids))
    chats = [i for i, e in enumerate(examples) if e.kind == "chat"]
    if chats:
        check_chat_template(tokenizer, where)
        for i in chats:
            out[i] = _fit_tail(*encode_chat(tokenizer, examples[i].messages), max_len, tr)
    return out, tr  # type: ignore[return-value]


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of (ids, labels) rows, to the longest row."""
    width = max(len(ids) for ids, _ in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class Batcher:
    """Encoded training examples of one peer; samples minibatches reproducibly.

    Minibatches are drawn uniformly with replacement by a ``torch.Generator`` seeded with ``seed``,
    so two processes with the same examples and seed draw identical batches.
    """

    examples: Sequence[Example]
    tokenizer: object
    batch_size: int
    seed: int
    max_len: int = 64
    where: str = "data"
    rows: list = field(init=False, repr=False)
    truncation: Truncation = field(init=False)

    def __post_init__(self):
        if not self.examples:
            raise ValueError("Batcher needs at least one example")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        self.batch_size, self.seed, self.max_len = int(self.batch_size), int(self.seed), int(self.max_len)
        self.pad_id = pad_id_of(self.tokenizer)
        self.rows, self.truncation = encode_examples(self.tokenizer, self.examples, self.max_len, self.where)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self.rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator)
        return collate([self.rows[i] for i in idx.tolist()], self.pad_id)

    def state_dict(self) -> dict:
        """Sampler state, for checkpointing."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
