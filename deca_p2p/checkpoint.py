"""Atomic Hugging Face checkpoints.

Each save goes to a fresh versioned directory (`<root>/ckpt-<tag>`), written through a temp dir, fsynced and
renamed; then the `<root>/latest` symlink is swapped to it with an atomic rename. A crash (even kill -9) at
any point leaves `latest` pointing at a whole, loadable checkpoint. `restore_weights` reads one back into a live
model strictly: every parameter and persistent buffer, bit for bit, or a `CheckpointError`.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .atomic import fsync_path
from .checkpoint_reuse import ST_DTYPES, Reuse, weight_file_names
from .models import QuietProgress

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is restored into (missing, extra or reshaped keys)."""


def save_atomic(model, tokenizer, root: str | Path, tag: str, extra_files: dict[str, str | bytes] | None = None, *,
                groups: Sequence[Iterable[str]] | None = None, changed: Iterable[str] | None = None) -> Path:
    """Save model (+ tokenizer, + extra files: text or bytes, by relative path, e.g. ``adapter/x.safetensors``)
    as `<root>/ckpt-<tag>` and point `<root>/latest` at it.

    A peer checkpoints the same model into the same root after every activation; from the second time on only the
    weights are written again (`checkpoint_reuse.Reuse`); the model's and tokenizer's other files are hard links to
    the last ones. GROUPS (tensor names, e.g. the blocks' parameters): the weights are kept block-sharded, one
    safetensors shard per group and one for the rest, with the index `from_pretrained` reads; CHANGED: the tensors
    that may differ from the last save into this root (None: any). A later save then rewrites only the shards that
    hold one and links the others: the caller vouches that nothing else changed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if str(root) not in _REUSE:  # this process's first save here: what a killed earlier one left goes
        _sweep(root)
    final = root / f"ckpt-{tag}-{time.time_ns()}"  # never the directory `latest` points to now
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    extra = extra_files or {}
    try:
        reuse = _REUSE.get(str(root))
        linked = (reuse.write(model, tokenizer, tmp, latest(root), skip=set(extra), groups=groups, changed=changed)
                  if reuse is not None else None)
        if linked is None:
            with QuietProgress():
                model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if reuse is None or not reuse.no_links:  # (a file system without hard links: always in full)
                reuse = Reuse.plan(model, tokenizer, tmp, groups)
            linked = ()
        for name, content in extra.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the directories that hold them
            if f.relative_to(tmp).as_posix() not in linked:  # a link's data is on disk already
                fsync_path(f)
        fsync_path(tmp)  # its entries (the links among them)
        os.rename(tmp, final)
        link_tmp = root / f".latest-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, root / LATEST)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _REUSE.pop(str(root), None)
        raise
    if reuse is not None:
        reuse.ckpt = final
        _REUSE[str(root)] = reuse
    else:
        _REUSE.pop(str(root), None)
    for old in root.glob("ckpt-*"):  # keep only what `latest` points to
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


_REUSE: dict[str, Reuse] = {}  # by checkpoint root: what the last save there can lend the next


def _sweep(root: Path) -> None:
    """Remove the temp directories and symlinks a save killed midway left in ROOT (one writer per root): a temp
    directory may hold links to a deleted checkpoint's shards, keeping their space."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".latest-*"):
        if p.is_symlink():
            p.unlink(missing_ok=True)


def latest(root: str | Path) -> Path | None:
    p = Path(root) / LATEST
    return p.resolve() if p.exists() else None


# --------------------------------------------------------------------------------------------------
# Strict restore
# --------------------------------------------------------------------------------------------------

def _weight_files(ckpt: Path) -> list[Path]:
    names = weight_file_names(ckpt)
    if names is None:
        if (ckpt / "model.safetensors.index.json").is_file():
            raise CheckpointError(f"checkpoint {ckpt}: unreadable model.safetensors.index.json")
        raise CheckpointError(f"checkpoint {ckpt} has no model.safetensors")
    return [ckpt / n for n in names]


def differing_keys(model, ckpt: str | Path) -> list[str]:
    """The keys whose tensor in CKPT's weight files is not exactly MODEL's (or that MODEL lacks), sorted."""
    sd = model.state_dict()
    return sorted(k for k, t in read_weights(ckpt).items()
                  if k not in sd or not torch.equal(t, sd[k].detach().to("cpu")))


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint's weight files hold, by key (one `model.safetensors`, or the shards of a
    block-sharded one)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(ckpt)):
        out.update(load_file(f))
    return out


def _file_entries(ckpt: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype) of every tensor in the checkpoint, from the headers only."""
    from safetensors import safe_open

    entries: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in _weight_files(ckpt):
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing its weight file {f.name}")
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    entries[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001 - a torn or foreign file
            raise CheckpointError(f"checkpoint {ckpt}: cannot read {f.name} ({' '.join(str(e).split())})") from None
    return entries



def _expected_entries(model) -> dict[str, tuple[tuple[int, ...], str | None]] | None:
    """key -> (shape, dtype) that `model.save_pretrained` writes for this model now (tied weights once, MoE
    experts split back to per-expert keys), computed on meta tensors; None when this transformers version has no
    such internals (the load report of `from_pretrained` is then the only key check)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return None
    sd = model.state_dict()
    for k in getattr(model, "_keys_to_ignore_on_save", None) or ():
        sd.pop(k, None)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, {k: v.to("meta") for k, v in sd.items()})
    return {k: (tuple(v.shape), ST_DTYPES.get(v.dtype)) for k, v in sd.items()}


def check_keys(expected, found, where: str, what: str = "key") -> None:
    """A one-line CheckpointError for the first key missing from `found`, else the first one it has in excess."""
    for k in sorted(expected):
        if k not in found:
            raise CheckpointError(f"{where} is missing {what} {k}")
    for k in sorted(found):
        if k not in expected:
            raise CheckpointError(f"{where} has unexpected {what} {k}")


def restore_weights(model, ckpt_dir: str | Path) -> None:
    """Restore every parameter and persistent buffer of `model` from a checkpoint written by :func:`save_atomic`.

    Strict: the checkpoint's keys must be exactly the keys `model.save_pretrained` would write for this model
    (same shapes and dtypes); loading goes through ``from_pretrained`` of the model's own class (which converts
    keys, e.g. per-expert MoE tensors to the fused in-memory ones, and `embed_out` to `lm_head` on GPT-NeoX) and
    must report no missing, unexpected or mismatched key; every tensor is then copied by name into `model` and
    checked equal. Tied weights are not "missing". Raises a one-line :class:`CheckpointError` naming the first
    offending key; `model` may be partly overwritten when the error comes from the final copy.
    """
    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no config.json")
    found = _file_entries(ckpt)
    expected = _expected_entries(model)
    if expected is not None:
        check_keys(expected, found, f"checkpoint {ckpt}")
        for k in sorted(expected):
            if found[k][0] != expected[k][0]:
                raise CheckpointError(f"checkpoint {ckpt}: key {k} has shape {list(found[k][0])}, "
                                      f"the model expects {list(expected[k][0])}")
            if expected[k][1] is not None and found[k][1] != expected[k][1]:
                raise CheckpointError(f"checkpoint {ckpt}: key {k} is stored as {found[k][1]}, "
                                      f"the model holds {expected[k][1]} (a restore would not be exact)")
    target = model.state_dict()  # parameters (tied ones under each name) and persistent buffers
    try:
        with QuietProgress():
            loaded, info = type(model).from_pretrained(
                ckpt, config=copy.deepcopy(model.config), dtype=model.dtype, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, it is an unusable checkpoint
        raise CheckpointError(f"checkpoint {ckpt}: cannot load ({' '.join(str(e).split())[:300]})") from None
    for what, keys in (("is missing key", info.get("missing_keys")), ("has unexpected key", info.get("unexpected_keys"))):
        if keys:
            raise CheckpointError(f"checkpoint {ckpt} {what} {sorted(keys)[0]}")
    if info.get("mismatched_keys"):
        k, shape_ckpt, shape_model = sorted(info["mismatched_keys"])[0]
        raise CheckpointError(f"checkpoint {ckpt}: key {k} has shape {list(shape_ckpt)}, "
                              f"the model expects {list(shape_model)}")
    if info.get("error_msgs"):
        raise CheckpointError(f"checkpoint {ckpt}: {' '.join(str(info['error_msgs'][0]).split())[:300]}")
    source = loaded.state_dict()
    for k in target:
        if k not in source:
            raise CheckpointError(f"checkpoint {ckpt} is missing key {k}")
        if source[k].shape != target[k].shape:
            raise CheckpointError(f"checkpoint {ckpt}: key {k} has shape {list(source[k].shape)}, "
                                  f"the model expects {list(target[k].shape)}")
        if source[k].dtype != target[k].dtype:
            raise CheckpointError(f"checkpoint {ckpt}: key {k} loads as {source[k].dtype}, "
                                  f"the model holds {target[k].dtype} (a restore would not be exact)")
    for k in source:
        if k not in target:
            raise CheckpointError(f"checkpoint {ckpt} has unexpected key {k}")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(source[k])
        for k, t in target.items():  # after all copies: tied weights must agree too
            if not torch.equal(t, source[k].to(t.device)):
                raise CheckpointError(f"checkpoint {ckpt}: key {k} did not restore exactly")
    del loaded, source
