"""One model at the end: the network average of the peers' final checkpoints, as a Hugging Face directory.

``deca-peer average RUN_DIR --out DIR [--weighted]`` (``average_run``) reads every peer's
``RUN_DIR/peer-<id>/checkpoint/latest`` (written by ``checkpoint.save_atomic``) and writes

    x̄ = Σ_i w_i x_i,   w_i = 1/n (default)   or   w_i = n_i / Σ_j n_j (``--weighted``)

where n_i is peer i's ``train_examples``, read from the first record of its ``metrics.jsonl`` that has one (the
peer's "start" record).  Each checkpoint is loaded with ``AutoModelForCausalLM.from_pretrained`` (so the
architecture's own key conversions apply, e.g. fused MoE experts) and added into a float64 accumulator one at a
time: memory is the first model (kept as the container of the result), the accumulator (float64) and the model
being read, whatever the number of peers.  Each tensor is cast back to its dtype in the checkpoint.  Tensors that
are not floating point (integer buffers) are not averaged: the first peer's value is kept.

The output is written atomically: built in a temp directory next to ``--out``, fsynced, then renamed into place.
``--out`` may be absent, an empty directory, or a directory that holds a previous average (it has the
``average.json`` written here), which is then replaced; any other existing path is refused, so a model or
checkpoint directory is never overwritten by mistake.  The tokenizer is the first peer's (all peers train the
same tokenizer, which DECA does not change).  ``average.json`` records the run, each peer's checkpoint and weight.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import atomic
from .checkpoint import LATEST
from .metrics import METRICS_FILE, peer_dir, records
from .models import QuietProgress

__all__ = ["AverageError", "MARKER", "peer_checkpoints", "train_examples", "average_checkpoints", "average_run"]

MARKER = "average.json"  # written into every average: marks a directory `average` may replace

# config fields that may differ between checkpoints of the same model without changing what the weights mean
_VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                              "_attn_implementation_autoset", "architectures"})


class AverageError(ValueError):
    """A run directory or checkpoints that cannot be averaged; the message is one line naming the cause."""


def peer_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """{peer id: its latest checkpoint directory} for every ``peer-<id>`` directory of ``run_dir``.

    Every peer directory must have a checkpoint: averaging the peers that happen to have one would silently give
    another model than the network's average.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise AverageError(f"run directory {run} {'is not a directory' if run.exists() else 'does not exist'}")
    # ASCII digits only: "peer-²" passes str.isdigit() but not int()
    ids = sorted(int(d.name[5:]) for d in run.glob("peer-*")
                 if d.is_dir() and d.name[5:].isascii() and d.name[5:].isdigit())
    if not ids:
        raise AverageError(f"{run} holds no peer directories (peer-<id>/checkpoint): is it a run directory?")
    out: dict[int, Path] = {}
    missing = []
    for i in ids:
        link = peer_dir(run, i) / "checkpoint" / LATEST
        if link.exists() and (link / "config.json").is_file():
            out[i] = link.resolve()
        else:
            missing.append(i)
    if not out:
        raise AverageError(f"{run} holds no peer checkpoints (peer-<id>/checkpoint/{LATEST}): did the run save any?")
    if missing:
        raise AverageError(f"{run}: peer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                           f"{'have' if len(missing) > 1 else 'has'} no checkpoint (peer-<id>/checkpoint/{LATEST}); "
                           "the average needs every peer")
    return out


def train_examples(run_dir: str | Path, peer_id: int) -> int:
    """Peer ``peer_id``'s number of training examples: the first metrics record of the peer that has one."""
    f = peer_dir(run_dir, peer_id) / METRICS_FILE
    try:
        recs = records(run_dir, peer_id)  # lines that are not a JSON object are skipped
    except OSError as e:
        raise AverageError(f"cannot read {f}: {e.strerror or e}") from None
    for rec in recs:
        if "train_examples" in rec:
            n = rec["train_examples"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise AverageError(f"{f}: train_examples is {n!r}, not a non-negative integer")
            return n
    raise AverageError(f"peer {peer_id}: no record with train_examples in {f} (needed by --weighted)")


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise AverageError(f"{len(w)} weights for {n} checkpoints")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise AverageError(f"weights must be finite and non-negative, got {w}")
    total = math.fsum(w)
    if total <= 0:
        raise AverageError("the weights sum to 0 (every peer has 0 training examples?)")
    return [x / total for x in w]


# transformers logs a multi-line LOAD REPORT here (missing, mismatched, unexpected tensors) before it raises
_LOAD_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


class _HeldLogs(logging.Filter):
    """Hold back the records of ``_LOAD_LOGGERS`` while a checkpoint loads: dropped if it fails (the one-line
    AverageError says why), passed on if it loads."""

    def __enter__(self):
        self.held: list[logging.LogRecord] = []
        for name in _LOAD_LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.append(record)
        return False

    def __exit__(self, *exc):
        for name in _LOAD_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        return False

    def release(self) -> None:
        for r in self.held:
            logging.getLogger(r.name).handle(r)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise AverageError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        with QuietProgress(), _HeldLogs() as logs:
            # mismatched sizes do not raise here: the loading info names them, for the error below
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - as models.load_model: OSError, SafetensorError (a damaged model.safetensors),
        # huggingface_hub's StrictDataclassError (a config.json field of the wrong type), ...: not a usable checkpoint
        msg = " ".join(str(e).split())
        raise AverageError(f"cannot load checkpoint {path}: {msg[:300]}") from None
    # transformers fills a missing or misshapen tensor with fresh random values and only logs it: that average
    # would be silently wrong
    if info.get("mismatched_keys"):
        k, got, want = sorted(info["mismatched_keys"], key=lambda m: m[0])[0]
        n = len(info["mismatched_keys"])
        raise AverageError(f"cannot load checkpoint {path}: tensor {k} has shape {tuple(got)} but its config.json "
                           f"needs {tuple(want)}{f' ({n - 1} more such tensors)' if n > 1 else ''}")
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise AverageError(f"cannot load checkpoint {path}: it lacks tensor{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} (its config.json needs {'them' if len(missing) > 1 else 'it'})")
    logs.release()
    return model


def _config_view(model) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG}


def average_checkpoints(dirs: Sequence[str | Path], weights: Sequence[float] | None = None):
    """The weighted average (uniform by default; weights are normalized) of the HF checkpoints ``dirs``.

    Returns the first checkpoint's model holding the averaged tensors, each in its original dtype.  Raises
    AverageError when the checkpoints are not of one architecture (class, config, tensor names and shapes).
    """
    paths = [Path(d) for d in dirs]
    if not paths:
        raise AverageError("no checkpoints to average")
    w = _normalized(weights, len(paths))
    first = _load(paths[0])
    first.eval()
    ref = {k: (tuple(v.shape), v.dtype) for k, v in first.state_dict().items()}
    ref_cls, ref_cfg = type(first).__name__, _config_view(first)
    acc: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, v in first.state_dict().items():
            if v.is_floating_point():
                acc[k] = v.detach().to(torch.float64) * w[0]
        for path, wi in zip(paths[1:], w[1:]):
            model = _load(path)
            if type(model).__name__ != ref_cls:
                raise AverageError(f"{path} is a {type(model).__name__}, {paths[0]} a {ref_cls}: "
                                   "checkpoints of different architectures")
            cfg = _config_view(model)
            if cfg != ref_cfg:
                diff = sorted(k for k in set(cfg) | set(ref_cfg) if cfg.get(k) != ref_cfg.get(k))
                raise AverageError(f"{path} and {paths[0]} have different configs ({', '.join(diff[:5])}"
                                   f"{', ...' if len(diff) > 5 else ''}): checkpoints of different models")
            sd = model.state_dict()
            if set(sd) != set(ref):
                only = sorted(set(sd) ^ set(ref))
                raise AverageError(f"{path} and {paths[0]} have different tensors (e.g. {only[0]}): "
                                   "checkpoints of different architectures")
            for k, v in sd.items():
                if tuple(v.shape) != ref[k][0]:
                    raise AverageError(f"{path}: tensor {k} has shape {tuple(v.shape)}, {ref[k][0]} in {paths[0]}")
                if k in acc:
                    if not v.is_floating_point():
                        raise AverageError(f"{path}: tensor {k} is {v.dtype}, {ref[k][1]} in {paths[0]}")
                    acc[k].add_(v.detach().to(torch.float64), alpha=wi)
            del model, sd, v
            gc.collect()  # free this model now (module graphs may hold cycles), before the next one is read
        for k, t in first.state_dict().items():
            if k in acc:
                t.copy_(acc[k].to(t.dtype))  # tied tensors share storage: both names copy the same value
    return first


def _check_out(out: Path) -> bool:
    """Whether ``out`` exists (then it is empty or a previous average); AverageError if it may not be replaced."""
    if not out.exists() and not out.is_symlink():
        # its closest existing ancestor must be a directory: fail now, not after the (slow) averaging
        up = next((a for a in out.parents if a.exists()), None)
        if up is not None and not up.is_dir():
            raise AverageError(f"--out {out}: {up} is not a directory")
        return False
    if out.is_symlink() or not out.is_dir():
        raise AverageError(f"--out {out} exists and is not a directory: refusing to overwrite it")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise AverageError(f"--out {out} is a non-empty directory that is not a previous average (no {MARKER}): "
                           "refusing to overwrite it; pick another --out or remove it")
    return True


def average_run(run_dir: str | Path, out: str | Path, weighted: bool = False, *, info: dict | None = None) -> Path:
    """Write the average of ``run_dir``'s peers' latest checkpoints to ``out`` (see the module doc); returns ``out``.

    ``info``, if given, is filled with what ``average.json`` records (peers, weights, checkpoints).
    """
    from transformers import AutoTokenizer

    run, out = Path(run_dir), Path(out)
    ckpts = peer_checkpoints(run)
    ids = sorted(ckpts)
    counts = {i: train_examples(run, i) for i in ids} if weighted else {}
    weights = _normalized([counts[i] for i in ids] if weighted else None, len(ids))
    try:
        exists = _check_out(out)  # before the (slow) averaging: fail fast
    except OSError as e:  # e.g. a parent this user may not search
        raise AverageError(f"--out {out}: {e.strerror or e}") from None
    model = average_checkpoints([ckpts[i] for i in ids], weights)
    tokenizer = None
    if (ckpts[ids[0]] / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpts[ids[0]], local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure: a checkpoint we cannot publish as is
            msg = " ".join(str(e).split())
            raise AverageError(f"cannot load the tokenizer of {ckpts[ids[0]]}: {msg[:300]}") from None
    states = {}
    for i in ids:
        f = ckpts[i] / "deca_state.json"
        try:
            states[i] = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits: no state
            states[i] = {}
    record = {
        "run_dir": str(run.resolve()),
        "weighting": "train_examples" if weighted else "uniform",
        "peers": {str(i): {"checkpoint": str(ckpts[i]), "weight": weights[k],
                           **({"train_examples": counts[i]} if weighted else {}),
                           **({"activation": states[i]["activation"]} if "activation" in states[i] else {})}
                  for k, i in enumerate(ids)},
        "dtype": str(next(iter(model.state_dict().values())).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": tokenizer is not None,
    }
    tmp = old = None
    try:  # creating the directories too: --out /proc/x fails here
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        with QuietProgress():
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)  # safetensors writes 0600: the average is for sharing, like any file
                atomic.fsync_path(f)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        if exists and _check_out(out) and any(out.iterdir()):
            # a previous average: move it aside, the new one in (put the old one back if that fails)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old / out.name, out)
                raise
        else:
            os.rename(tmp, out)  # also over an empty directory: rename(2) replaces it
        atomic.fsync_path(out.parent)
    except OSError as e:
        raise AverageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if info is not None:
        info.update(record)
    return out
