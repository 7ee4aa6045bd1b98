"""Training records: the three JSONL formats, reading and writing them, and non-IID splits.

A record (one JSONL line) is one of
* ``{"prompt": str, "completion": str}``: loss on the completion;
* ``{"messages": [{"role": str, "content": str}, ...]}``: a conversation rendered with the model's chat
  template, loss on the assistant turns (at least one is required);
* ``{"text": str}``: plain language modelling;
each with an optional ``"label"`` (a task or source name: what the Dirichlet split skews over and what the
evaluation reports accuracy by). How records become tokens is encoding.py's job.
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

from . import atomic


class DataError(ValueError):
    """Bad training/evaluation data; the message is one line naming the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str = ""
    completion: str = ""
    label: str = "default"
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...) for chat records
    text: str | None = None                             # plain language-modelling records

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "text" if self.text is not None else "prompt"

    def to_record(self) -> dict:
        if self.kind == "chat":
            rec = {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        elif self.kind == "text":
            rec = {"text": self.text}
        else:
            rec = {"prompt": self.prompt, "completion": self.completion}
        rec["label"] = self.label
        return rec


# --------------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------------


def _string(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing {key!r}")
        return None
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def parse_record(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    label = _string(obj, "label", where, required=False) or "default"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        turns = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{k}] must be an object with 'role' and 'content'")
            turns.append((_string(m, "role", f"{where}: messages[{k}]"), _string(m, "content", f"{where}: messages[{k}]")))
        if not any(r == "assistant" for r, _ in turns):
            raise DataError(f"{where}: a conversation needs at least one 'assistant' turn (the loss is taken on those)")
        return Example(label=label, messages=tuple(turns))
    if "text" in obj and "prompt" not in obj:
        return Example(label=label, text=_string(obj, "text", where))
    if "prompt" not in obj and "completion" not in obj:
        raise DataError(f"{where}: expected 'prompt' and 'completion', 'messages', or 'text'")
    return Example(_string(obj, "prompt", where), _string(obj, "completion", where), label)


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read records (any of the three formats, mixed freely); blank lines are skipped.

    Raises :class:`DataError` ("<file>:<line>: <why>") for unreadable files, bad JSON, a record of no known
    format, a missing or non-string field, or a file with no records.
    """
    name = str(path)
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a JSONL file") from None
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
        out.append(parse_record(obj, f"{name}:{lineno}"))
    if not out:
        raise DataError(f"{name}: no examples (empty file)")
    return out


def write_jsonl(path: str | os.PathLike, examples: Sequence[Example]) -> Path:
    """Write records atomically (temp file, fsync, rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "".join(json.dumps(e.to_record(), ensure_ascii=False) + "\n" for e in examples))
    return path


def hold_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded ``fraction`` of each label held out (at least one example when there are two
    or more), order otherwise kept."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    rng = random.Random(f"deca-p2p/hold-out/{seed}")
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        k = int(round(fraction * len(idx)))
        held.update(rng.sample(idx, min(len(idx) - 1, k)))
    if not held and fraction > 0 and len(examples) >= 2:
        held.add(rng.randrange(len(examples)))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# --------------------------------------------------------------------------------------------------
# Non-IID partitioning
# --------------------------------------------------------------------------------------------------


def dirichlet_split(
    labels: Sequence[str], n_peers: int, alpha: float = 0.25, seed: int = 0, max_tries: int = 1000,
    min_size: int = 1,
) -> list[list[int]]:
    """Split example indices over ``n_peers`` with label skew (Dirichlet(alpha) per label).

    For each label (in sorted order) the proportions over peers are drawn from
    ``Dirichlet(alpha * ones(n_peers))`` and that label's shuffled indices are cut accordingly.
    Every index appears exactly once overall; every peer gets at least ``min_size`` examples (if a draw
    leaves a peer empty, the split is redrawn from the seed sequence ``(seed, 1)``, ``(seed, 2)``,
    ...: deterministic, and never the split of another seed). Small ``alpha``
    means strong skew; large ``alpha`` approaches an IID split. Each peer's indices are sorted.
    """
    n = len(labels)
    if n_peers < 1:
        raise ValueError(f"n_peers must be >= 1, got {n_peers}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    min_size = max(1, int(min_size))
    if n < n_peers * min_size:
        raise ValueError(f"cannot give each of {n_peers} peers {min_size} example{'s' if min_size > 1 else ''}: "
                         f"only {n} examples")
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
        if all(len(p) >= min_size for p in parts):
            return [sorted(p) for p in parts]
    raise ValueError(
        f"dirichlet_split: some peer got fewer than {min_size} examples after {max_tries} draws "
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
