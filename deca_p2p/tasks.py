"""The embedded default data: generated instruction tasks with exact answers, deterministic for a seed."""
from __future__ import annotations

import random

from .data import Example

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
