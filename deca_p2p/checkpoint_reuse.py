"""How the next checkpoint of one model into one root is written without `save_pretrained`: the weights written again
(only the shards that changed, where the caller says which tensors did), every other file hard-linked from the last
checkpoint (checkpoint.save_atomic uses it).

A peer writes one checkpoint per activation, and between two of them only the active block changed. Kept in one
weight file, every save rewrites the whole model: on Qwen2.5-0.5B's architecture (1 GB in bf16) 784-899 ms per save on
this machine, where its local step computes in ~0.8 s (benchmarks/results/checkpoint_cost.md, realistic_size.md).
Kept *block-sharded* (one safetensors shard per block, one for everything no block holds, and the
`model.safetensors.index.json` that `from_pretrained` reads), a save writes the changed block's shard alone and links
the rest: 30-38 ms there; its cost follows the block, not the model.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def weight_file_names(ckpt: Path) -> list[str] | None:
    """The weight files of a checkpoint directory: the shards its index names, or the one `model.safetensors`;
    None when it has neither or an unreadable index."""
    if (ckpt / INDEX).is_file():
        try:
            names = set(json.loads((ckpt / INDEX).read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        # a shard is a file beside the index: not a path elsewhere, not a hidden or foreign file
        ok = all(isinstance(n, str) and n.endswith(".safetensors") and "/" not in n and "\\" not in n
                 and not n.startswith(".") for n in names)
        return sorted(names) if ok and names else None
    return [SINGLE] if (ckpt / SINGLE).is_file() else None


def shard_layout(keys: Sequence[str], groups: Sequence[Iterable[str]] | None) -> list[tuple[str, list[str]]]:
    """(file name, keys) of each weight file: one `model.safetensors` without groups; with them, Hugging Face's
    shard names, the keys no group names first, then one shard per group that holds a key (in the groups' order)."""
    if groups is None:
        return [(SINGLE, list(keys))]
    owner: dict[str, int] = {}
    for gi, names in enumerate(groups):
        for n in names:
            owner.setdefault(n, gi)
    parts = [[k for k in keys if k not in owner]] + [[k for k in keys if owner.get(k) == gi] for gi in range(len(groups))]
    parts = [p for p in parts if p]
    return [(f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors", p) for i, p in enumerate(parts)]


def _layout(sd: dict) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}


def _groups_key(groups: Sequence[Iterable[str]] | None) -> tuple | None:
    return None if groups is None else tuple(tuple(g) for g in groups)


class Reuse:
    """What one save into a root lends the next. Valid only where `save_pretrained` wrote plain weight files whose
    keys are state_dict names with the tensors' own shapes and dtypes (no key conversion): then writing those tensors
    with safetensors gives the same files. The other files (config.json, generation_config.json, the tokenizer's, the
    shard index) are linked from the last checkpoint: for the same model object with the same tensor layout, the same
    tokenizer object and the same groups. A peer never edits its model's config after loading; a caller that does
    must save into a fresh root."""

    def __init__(self, model, tokenizer, shards: list[tuple[str, list[str]]], layout: dict, metadata: dict | None,
                 static: list[str], groups: tuple | None):
        self.model = weakref.ref(model)
        self.tokenizer = None if tokenizer is None else weakref.ref(tokenizer)  # its files are linked too
        self.shards, self.layout, self.metadata, self.static, self.groups = shards, layout, metadata, static, groups
        self.ckpt: Path | None = None
        self.no_links = False  # os.link failed here once: every save in full from then on

    @classmethod
    def plan(cls, model, tokenizer, ckpt: Path, groups: Sequence[Iterable[str]] | None = None) -> "Reuse | None":
        """The reuse of a checkpoint `save_pretrained` just wrote into CKPT (still private to the caller), or None.
        With GROUPS, the weights are first rewritten block-sharded there (shard_layout)."""
        from safetensors import safe_open

        names = weight_file_names(ckpt)
        if names is None or (groups is None and names != [SINGLE]):
            return None
        sd = model.state_dict()
        keys: list[str] = []
        metadata = None
        for name in names:
            with safe_open(ckpt / name, framework="pt") as st:
                metadata = metadata or st.metadata()
                for k in st.keys():
                    sl = st.get_slice(k)
                    t = sd.get(k)
                    if t is None or tuple(sl.get_shape()) != tuple(t.shape) or sl.get_dtype() != ST_DTYPES.get(t.dtype):
                        return None
                    keys.append(k)
        shards = shard_layout(keys, groups)
        if groups is not None:
            _write_sharded(sd, ckpt, shards, metadata, old=names)
        written = {name for name, _ in shards}
        static = sorted(f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*") if f.is_file()
                        and f.relative_to(ckpt).as_posix() not in written)
        try:
            return cls(model, tokenizer, shards, _layout(sd), metadata, static, _groups_key(groups))
        except TypeError:  # a tokenizer that cannot be weakly referenced
            return None

    def write(self, model, tokenizer, tmp: Path, last: Path | None, skip: set[str],
              groups: Sequence[Iterable[str]] | None = None, changed: Iterable[str] | None = None) -> tuple[str, ...] | None:
        """Write the weights into TMP and link the rest from LAST, except the names in SKIP (the caller writes those);
        the linked names, or None (then nothing was written: the caller saves in full). CHANGED: the tensors that may
        differ from the last save (None: any); a shard holding none of them (nor a tensor sharing storage with one,
        as tied weights do) is linked too."""
        if self.no_links or self.model() is not model or _groups_key(groups) != self.groups:
            return None
        if (tokenizer is None) != (self.tokenizer is None):
            return None
        if self.tokenizer is not None and self.tokenizer() is not tokenizer:  # (a dead reference is None: no match)
            return None
        if last is None or self.ckpt is None or last != self.ckpt.resolve():
            return None  # someone else wrote this root since
        sd = model.state_dict()
        if _layout(sd) != self.layout:
            return None
        dirty = _dirty(sd, changed) if self.groups is not None else None  # one file: always written
        keep = [name for name, keys in self.shards if dirty is not None and not any(_in(sd, k, dirty) for k in keys)]
        linked = tuple(n for n in self.static + keep if n not in skip)
        if not all((last / name).is_file() for name in linked):
            return None
        try:
            for name in linked:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(last / name, tmp / name)
                except OSError:
                    self.no_links = True
                    raise
            for name, keys in self.shards:
                if name not in keep:
                    _save_shard(sd, keys, tmp / name, self.metadata)
        except (OSError, KeyError, ValueError, RuntimeError):  # no hard links here, a changed model
            for f in sorted(tmp.rglob("*"), reverse=True):
                f.rmdir() if f.is_dir() else f.unlink()
            return None
        return linked


def _dirty(sd: dict, changed: Iterable[str] | None) -> tuple[set[str], set[int]] | None:
    """(names, storage addresses) of the changed tensors; None: everything may have changed."""
    if changed is None:
        return None
    names = set(changed)
    return names, {sd[n].data_ptr() for n in names if n in sd and sd[n].numel()}


def _in(sd: dict, key: str, dirty: tuple[set[str], set[int]]) -> bool:
    names, ptrs = dirty
    return key in names or (sd[key].numel() > 0 and sd[key].data_ptr() in ptrs)


def _save_shard(sd: dict, keys: list[str], path: Path, metadata: dict | None) -> None:
    from safetensors.torch import save_file

    save_file({k: sd[k].detach().contiguous() for k in keys}, path, metadata=metadata)


def _write_sharded(sd: dict, ckpt: Path, shards: list[tuple[str, list[str]]], metadata: dict | None,
                   old: list[str]) -> None:
    """Replace the weight files `save_pretrained` wrote into CKPT by SHARDS and their index."""
    for name in old:
        (ckpt / name).unlink()
    (ckpt / INDEX).unlink(missing_ok=True)
    weight_map = {}
    total = 0
    for name, keys in shards:
        _save_shard(sd, keys, ckpt / name, metadata)
        for k in keys:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
    (ckpt / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                         indent=2) + "\n")
