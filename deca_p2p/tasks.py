"""The embedded default data: generated instruction tasks with exact answers, deterministic for a seed.

Two disjoint task families share one character world and one prompt format, ``"<name>:<input>="`` followed by
the answer:

* the **pretraining** family (:data:`PRETRAIN_TASKS`) teaches the primitives (copy a string, map characters,
  pick a character by position or order, measure a length, increment a number). The shipped base model
  (``deca_p2p/base_model``, made by ``scripts/pretrain_base.py``) was trained on it centrally.
* the **fine-tuning** family (:data:`TASKS`) is what the peers fine-tune that base on (``default_dataset``, the
  cluster's embedded data). The base has never seen these prompt names and scores ~0 on them; each task is a
  short composition of the primitives above.
"""
from __future__ import annotations

import random
from typing import Sequence

from .data import Example

# --------------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ROT = str.maketrans(_LETTERS, _LETTERS[1:] + _LETTERS[0])
_COUNT_ALPHABET = "abcde"  # small alphabet so that counts are non-trivial
_DEDUP_ALPHABET = "abcde"  # small alphabet and long words: almost every word repeats a letter
_MIN_LEN, _MAX_LEN = 3, 7

TASKS: tuple[str, ...] = ("rev", "sort", "add", "count", "dedup", "rot")
"""The fine-tuning family (the cluster's embedded data); each name is also the label of its examples:

* ``rev``:   ``"rev:abcd="``      -> ``"dcba"``
* ``sort``:  ``"sort:dbca="``     -> ``"abcd"``
* ``add``:   ``"add:12+34="``     -> ``"46"``   (operands 0..99)
* ``count``: ``"cnt:a,abaca="``   -> ``"3"``    (occurrences of a letter in a string over a..e)
* ``dedup``: ``"dedup:abacbd="``  -> ``"abcd"`` (each letter once, in order of first occurrence; words of 5..9
  letters over a..e)
* ``rot``:   ``"rot:abz="``       -> ``"bca"``  (every letter shifted by one, z wraps to a)
"""

PRETRAIN_TASKS: tuple[str, ...] = ("copy", "upper", "lower", "swap", "first", "last", "len", "min", "inc")
"""The pretraining family (what the shipped base model learned), disjoint from :data:`TASKS`:

* ``copy``:  ``"copy:hello="``  -> ``"hello"``
* ``upper``: ``"up:abc="``      -> ``"ABC"``
* ``lower``: ``"low:ABC="``     -> ``"abc"``
* ``swap``:  ``"swap:aBc="``    -> ``"AbC"``  (swap the case of every letter)
* ``first``: ``"first:hello="`` -> ``"h"``
* ``last``:  ``"last:hello="``  -> ``"o"``
* ``len``:   ``"len:hello="``   -> ``"5"``    (1..9 letters)
* ``min``:   ``"min:dbca="``    -> ``"a"``    (alphabetically smallest letter)
* ``inc``:   ``"inc:129="``     -> ``"130"``  (0..998, plus one)
"""

ALL_TASKS: tuple[str, ...] = PRETRAIN_TASKS + TASKS


def _rand_word(rng: random.Random, alphabet: str = _LETTERS, lo: int = _MIN_LEN, hi: int = _MAX_LEN) -> str:
    n = rng.randint(lo, hi)
    return "".join(rng.choice(alphabet) for _ in range(n))


def _dedup(w: str) -> str:
    return "".join(dict.fromkeys(w))


def _make_one(task: str, rng: random.Random) -> Example:
    # fine-tuning family
    if task == "rev":
        w = _rand_word(rng)
        return Example(f"rev:{w}=", w[::-1], task)
    if task == "sort":
        w = _rand_word(rng)
        return Example(f"sort:{w}=", "".join(sorted(w)), task)
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Example(f"add:{a}+{b}=", str(a + b), task)
    if task == "count":
        c = rng.choice(_COUNT_ALPHABET)
        w = _rand_word(rng, _COUNT_ALPHABET)
        return Example(f"cnt:{c},{w}=", str(w.count(c)), task)
    if task == "dedup":
        w = _rand_word(rng, _DEDUP_ALPHABET, 5, 9)
        return Example(f"dedup:{w}=", _dedup(w), task)
    if task == "rot":
        w = _rand_word(rng)
        return Example(f"rot:{w}=", w.translate(_ROT), task)
    # pretraining family
    if task == "copy":
        w = _rand_word(rng)
        return Example(f"copy:{w}=", w, task)
    if task == "upper":
        w = _rand_word(rng)
        return Example(f"up:{w}=", w.upper(), task)
    if task == "lower":
        w = _rand_word(rng).upper()
        return Example(f"low:{w}=", w.lower(), task)
    if task == "swap":
        w = "".join(c.upper() if rng.random() < 0.5 else c for c in _rand_word(rng))
        return Example(f"swap:{w}=", w.swapcase(), task)
    if task == "first":
        w = _rand_word(rng)
        return Example(f"first:{w}=", w[0], task)
    if task == "last":
        w = _rand_word(rng)
        return Example(f"last:{w}=", w[-1], task)
    if task == "len":
        w = _rand_word(rng, _LETTERS, 1, 9)
        return Example(f"len:{w}=", str(len(w)), task)
    if task == "min":
        w = _rand_word(rng)
        return Example(f"min:{w}=", min(w), task)
    if task == "inc":
        n = rng.randint(0, 998)
        return Example(f"inc:{n}=", str(n + 1), task)
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")


def make_task_examples(task: str, n: int, rng: random.Random) -> list[Example]:
    """``n`` random examples of ``task`` (either family; duplicates possible), drawn from ``rng``."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_make_one(task, rng) for _ in range(n)]


def task_dataset(
    tasks: Sequence[str], n_train_per_task: int, n_eval_per_task: int, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Generated (train, eval) over ``tasks``, deterministic for ``seed`` (each task has its own stream).

    Eval prompts are unique and never occur in train. Train is shuffled (seeded); eval is grouped
    by task, in the order of ``tasks``.
    """
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(ALL_TASKS)}")
    train: list[Example] = []
    evals: list[Example] = []
    for task in tasks:
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


def default_dataset(
    n_train_per_task: int = 2000, n_eval_per_task: int = 40, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Generated (train, eval) over the fine-tuning family :data:`TASKS`, deterministic for ``seed``.

    Eval prompts are unique and never occur in train. Train is shuffled (seeded); eval is grouped
    by task, in :data:`TASKS` order.
    """
    return task_dataset(TASKS, n_train_per_task, n_eval_per_task, seed)
