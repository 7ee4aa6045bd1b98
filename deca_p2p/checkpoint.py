"""Atomic Hugging Face checkpoints.

Each save goes to a fresh versioned directory (`<root>/ckpt-<tag>`), written through a temp dir, fsynced and
renamed; then the `<root>/latest` symlink is swapped to it with an atomic rename. A crash (even kill -9) at
any point leaves `latest` pointing at a whole, loadable checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .models import QuietProgress

LATEST = "latest"


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(model, tokenizer, root: str | Path, tag: str, extra_files: dict[str, str] | None = None) -> Path:
    """Save model (+ tokenizer, + small text files) as `<root>/ckpt-<tag>` and point `<root>/latest` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{tag}-{time.time_ns()}"  # never the directory `latest` points to now
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        with QuietProgress():
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            _fsync_path(f)
        os.rename(tmp, final)
        link_tmp = root / f".latest-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(final.name, link_tmp)
        os.replace(link_tmp, root / LATEST)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("ckpt-*"):  # keep only what `latest` points to
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: str | Path) -> Path | None:
    p = Path(root) / LATEST
    return p.resolve() if p.exists() else None
