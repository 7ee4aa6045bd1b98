"""Decentralized LoRA (`--algo declora`), the paper's main baseline: LoRA adapters on every peer, gossiped.

Every peer wraps the same frozen base model with `peft` LoRA adapters (rank `lora_rank`, scale `lora_alpha /
lora_rank`, target modules `lora_targets`, dropout 0). The adapters' initial values come from `cfg.seed` alone,
drawn under a forked RNG, so every peer starts from the same adapters whatever its id (consensus is meaningless
otherwise). All adapter parameters form one block, trained with Adam + gossip (decentralized Adam on the
adapters); their names on the wire are peft's parameter names.

Checkpoints are written merged: the adapters are folded into a copy of the base weights (W + scale·B·A,
`merge_and_unload`), so `AutoModelForCausalLM.from_pretrained(ckpt)` loads a plain model without peft and
`deca-peer average` averages merged models. What a restart needs sits beside it in the same atomic checkpoint,
in peft's own layout (`adapter/adapter_model.safetensors`, `adapter/adapter_config.json`; `PeftModel.from_pretrained`
reads it): `restore_adapters` puts the adapters back bit for bit into a freshly wrapped base model.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, TrainConfig

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "lora_"  # peft names every adapter parameter ...lora_A.<adapter>.weight / ...lora_B.<adapter>.weight


def target_modules(spec: str) -> str | list[str]:
    """`lora_targets` as peft takes it: "all-linear" (every linear layer but the output head) or a list of names."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("lora_targets must be 'all-linear' or a comma-separated list of module names")
    return names


def wrap(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`model` (modified in place) with LoRA adapters, their initial values a function of `cfg.seed` only."""
    from peft import LoraConfig, get_peft_model

    _check_rank(model, cfg)
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=target_modules(cfg.lora_targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(cfg.seed)  # the same adapters on every peer, and the caller's RNG left as it was
        try:
            wrapped = get_peft_model(model, lcfg)
        except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
            raise ConfigError(f"lora_targets {cfg.lora_targets!r}: {' '.join(str(e).split())[:300]}") from None
    if not adapter_names(wrapped):
        raise ConfigError(f"lora_targets {cfg.lora_targets!r} put no adapter on {type(model).__name__}")
    return wrapped


def _check_rank(model: nn.Module, cfg: TrainConfig) -> None:
    """A rank above a targeted layer's smaller side adds nothing a full update would not, and a huge one (100000)
    builds adapters that never finish: reject it before peft allocates them."""
    targets = target_modules(cfg.lora_targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    narrowest = None
    for name, mod in model.named_modules():
        # nn.Linear, and transformers' Conv1D (GPT-2): the linear layers peft puts adapters on
        if not (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D") or getattr(mod, "weight", None) is None:
            continue
        if targets == "all-linear" and mod is head:
            continue
        if targets != "all-linear" and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        width = min(mod.weight.shape)
        if narrowest is None or width < narrowest[1]:
            narrowest = (name, width)
    if narrowest is not None and cfg.lora_rank > narrowest[1]:
        raise ConfigError(f"lora_rank {cfg.lora_rank} is larger than the targeted layer {narrowest[0]} "
                          f"({narrowest[1]} wide): use at most {narrowest[1]}")


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The adapter parameters (the declora block), by the wrapped model's parameter names."""
    return tuple(n for n, _ in model.named_parameters() if PREFIX in n)


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A plain HF model: the adapters merged into a copy of the base weights (`model` is left as it is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return copy.deepcopy(model).merge_and_unload()


def adapter_files(model: nn.Module) -> dict[str, bytes | str]:
    """The adapters in peft's layout, as files of a checkpoint directory (for `checkpoint.save_atomic`)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"].to_dict()
    return {f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}": save(state, metadata={"format": "pt"}),
            f"{ADAPTER_DIR}/{ADAPTER_CONFIG}": json.dumps(config, indent=2, sort_keys=True,
                                                          default=lambda o: sorted(o) if isinstance(o, set) else str(o))}


@torch.no_grad()
def restore_adapters(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Put a checkpoint's adapters back into `model` (wrapped by `wrap`), bit for bit, or raise a one-line
    `CheckpointError` naming the first key that is missing, unexpected, reshaped or of another dtype."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, check_keys

    path = Path(ckpt_dir) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {ADAPTER_DIR}/{ADAPTER_WEIGHTS} "
                              "(it was not written by --algo declora)")
    saved = load_file(path)
    own = get_peft_model_state_dict(model)
    check_keys(own, saved, f"checkpoint {ckpt_dir}", "adapter key")
    for k in sorted(saved):
        if saved[k].shape != own[k].shape or saved[k].dtype != own[k].dtype:
            raise CheckpointError(f"checkpoint {ckpt_dir}: adapter key {k} is {saved[k].dtype} {list(saved[k].shape)}, "
                                  f"the model holds {own[k].dtype} {list(own[k].shape)}")
    set_peft_model_state_dict(model, saved)
    now = get_peft_model_state_dict(model)
    for k in sorted(saved):
        if not torch.equal(now[k].cpu(), saved[k]):
            raise CheckpointError(f"checkpoint {ckpt_dir}: adapter key {k} did not restore exactly")
