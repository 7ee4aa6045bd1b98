"""The configuration fingerprint a peer carries in its hello: what every peer of a network must agree on.

Peers whose model, block partition, schedule or topology differ cannot work together, but nothing on the wire
would say so: they drop each other's blocks (`names`, `shape`, `position`, `stale`, `chain_gap`), time out and mix
without each other, and the run "succeeds". So every hello carries a small map (PROTOCOL.md §6.1)::

    {"digest": "<16 hex: sha256 of the fields that must agree>",
     "protocol": "3", "algo": "deca", "comm": "gossip", "lora_rank": "n/a", ..., "inner_steps": "32", ...,
     "topology": "8 nodes, 8 edges #…", "model": "llama, 4 layers, hidden 128, 877,568 params #…",
     "blocks": "6 blocks, 877,568 params #…",
     "local.lr": "0.001", "local.codec": "raw", ...}

Fields without the ``local.`` prefix (``AGREE``, in that order) must be equal on both sides of every link: the
hello barrier fails both peers at start-up with one line naming the first that differs (`first_difference`).
``local.`` fields are each peer's own choice (optimizer hyperparameters, codec, working dtype, batch): they
interoperate but change what the network computes, so differences are reported (`local_differences`), never
refused. Every value is a short string (at most 200 characters); long things are summarised and hashed.

Deliberately not covered: each peer's data (private by design), timeouts, link emulation, the weights themselves
(peers may resume from different checkpoints; the frozen part of a base model is not hashed: too costly for a
big model), and whether the exchanged tensors' dtypes agree (they do by construction: every peer exchanges the
float32 master copy of its active block whatever its ``--dtype``, and receivers accept any codec).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

LOCAL = "local."  # prefix of the fields that may differ between peers (reported, not refused)
NA = "n/a"        # a field that does not apply to this configuration (e.g. lora_rank without declora)
MAX_VALUE_LEN = 200

# The fields that must agree, in the order they are compared (config keys first, so a config difference is named
# by its own key rather than by the derived "model"/"blocks" summaries it also changes).
AGREE = ("protocol", "algo", "comm", "lora_rank", "lora_alpha", "lora_targets", "embeddings_block", "head_block",
         "layers_per_block", "rounds", "inner_steps", "gossip_every", "block_order", "seed", "topology", "model",
         "blocks")
# Each peer's own choices: they interoperate (the messages and the exchange schedule do not change) but change the
# algorithm, so a difference is reported in the log.
LOCAL_KEYS = ("lr", "lr_schedule", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "discrepancy",
              "alphas", "betas", "eps", "codec", "dtype", "batch_size", "grad_accum", "robust", "mix_dtype", "overlap")


def canonical_json(obj: Any) -> bytes:
    """The bytes every hash of the fingerprint is taken over (PROTOCOL.md §6.1.1): JSON without whitespace, object
    keys sorted, non-ASCII escaped. Only strings, integers, lists and string-keyed maps go in (no floats, whose
    text differs between languages): then any JSON encoder that sorts keys and adds no space gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:n]


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_s(x) for x in v) + "]"
    s = repr(v) if isinstance(v, float) else str(v)
    return s if len(s) <= MAX_VALUE_LEN else s[: MAX_VALUE_LEN - 3] + "..."


def digest(fp: Mapping[str, str]) -> str:
    """sha256 (16 hex digits) of the fields that must agree, independent of their order."""
    return _hash({k: v for k, v in fp.items() if k != "digest" and not k.startswith(LOCAL)}, 16)


def weight_text(w: float) -> str:
    """A mixing weight as the fingerprint hashes it: fixed-point, 12 digits after the point (C's "%.12f")."""
    return "%.12f" % float(w)


def _topology(topo) -> str:
    # every weight of the matrix (self entries included) as text: floats' JSON spelling differs between languages
    weights = {str(i): {str(j): weight_text(w) for j, w in row.items()} for i, row in topo.weights.items()}
    edges = sorted([min(e), max(e)] for e in topo.edges)
    return f"{len(topo.nodes)} nodes, {len(topo.edges)} edges #{_hash([sorted(topo.nodes), edges, weights])}"


def _model(model, lora_prefix: str | None) -> str:
    # sorted by name: what a peer can read from any checkpoint file, whatever order its framework registers them in
    named = sorted([n, list(p.shape)] for n, p in model.named_parameters() if not (lora_prefix and lora_prefix in n))
    numel = 0
    for _, shape in named:
        k = 1
        for d in shape:
            k *= d
        numel += k
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or type(model).__name__
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    parts = [str(kind)[:40]]
    if layers is not None:
        parts.append(f"{layers} layers")
    if hidden is not None:
        parts.append(f"hidden {hidden}")
    parts.append(f"{numel:,} params #{_hash(named)}")
    return ", ".join(parts)


def _blocks(model, blocks) -> str:
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    layout = [sorted([n, shapes[n]] for n in b.param_names) for b in blocks]  # block order; names sorted within
    numel = 0
    for b in layout:
        for _, shape in b:
            k = 1
            for d in shape:
                k *= d
            numel += k
    return f"{len(blocks)} blocks, {numel:,} params #{_hash(layout)}"


def build(cfg, model, blocks, topo, protocol: int | None = None) -> dict[str, str]:
    """This peer's fingerprint: ``cfg`` (TrainConfig), its (wrapped) model, its block partition and its topology."""
    if protocol is None:
        from .wire import VERSION as protocol
    declora, deca = cfg.algo == "declora", cfg.algo == "deca"
    lora_prefix = None
    if declora:
        from .lora import PREFIX as lora_prefix
    fp = {
        "protocol": str(protocol),
        "algo": cfg.algo,
        "comm": cfg.comm,
        "lora_rank": _s(cfg.lora_rank) if declora else NA,
        "lora_alpha": _s(cfg.lora_alpha) if declora else NA,
        "lora_targets": _s(cfg.lora_targets) if declora else NA,
        "embeddings_block": _s(cfg.embeddings_block) if deca else NA,
        "head_block": _s(cfg.head_block) if deca else NA,
        "layers_per_block": _s(cfg.layers_per_block) if deca else NA,
        "rounds": _s(cfg.rounds),
        "inner_steps": _s(cfg.inner_steps),
        "gossip_every": _s(cfg.gossip_every),
        "block_order": cfg.block_order,
        # the seed matters to the network only through the random block order and declora's initial adapters
        "seed": _s(cfg.seed) if cfg.block_order == "random" or declora else NA,
        "topology": _topology(topo),
        "model": _model(model, lora_prefix),
        "blocks": _blocks(model, blocks),
    }
    assert tuple(fp) == AGREE
    fp = {"digest": digest(fp), **fp}
    fp.update({LOCAL + k: _s(getattr(cfg, k, NA)) for k in LOCAL_KEYS})
    return fp


def first_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first field that must agree and does not: (field, my value, theirs); "absent" for a missing field.
    None when every such field agrees (``local.`` fields and ``digest`` are not compared)."""
    keys = [k for k in mine if k != "digest" and not k.startswith(LOCAL)]
    keys += [k for k in theirs if k != "digest" and not k.startswith(LOCAL) and k not in mine]
    for k in keys:
        a, b = mine.get(k, "absent"), theirs.get(k, "absent")
        if a != b:
            return k, a, b
    return None


def describe(field: str, mine: str, theirs: str) -> str:
    return f"{field} ({mine} vs {theirs})"


def local_differences(mine: Mapping[str, str], theirs: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The per-peer settings (``local.`` fields) that differ: {setting: (mine, theirs)}."""
    out = {}
    for k in sorted(set(mine) | set(theirs)):
        if k.startswith(LOCAL) and mine.get(k, "absent") != theirs.get(k, "absent"):
            out[k[len(LOCAL):]] = (mine.get(k, "absent"), theirs.get(k, "absent"))
    return out
