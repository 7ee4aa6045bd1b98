"""Run configuration: one dataclass, read from TOML or YAML, overridden from the command line."""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_LR = 1e3  # far above any useful rate; larger ones overflow float32 in the Adam step
LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_SEED = 2**32  # seed and dp_seed are in [0, MAX_SEED) (see validate)
# every other integer setting is at most this: counts go into msgpack headers and torch as 64-bit ints, and a
# `rounds: 1e30` is a typo, not a plan
MAX_COUNT = 2**31 - 1
MAX_THREADS = 4096
CPU_MAX_LEN, GPU_MAX_LEN = 1024, 4096  # default sequence caps: a 1024-token step is seconds on a CPU


class ConfigError(ValueError):
    """A bad config file or value; the message is one line naming the cause."""


@dataclass
class TrainConfig:
    # optimizer
    algo: str = "deca"                # deca | dadam (Adam on all parameters + gossip) | dsgd | declora (LoRA + Adam + gossip)
    # DECA's h_r reading (DESIGN §2): paper | qg | consensus | none. Fine-tuning the pretrained base, no BMA reading
    # beat "none" (benchmarks/results/finetune.md: paired differences in mean-peer eval loss, 3 seeds), as from
    # random init before (convergence.md).
    discrepancy: str = "none"
    lr: float = 3e-3                  # the best of 3e-4 / 1e-3 / 3e-3 for DECA in benchmarks/results/finetune.md
    alphas: tuple[float, float] = (0.9, 0.999)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # declora: LoRA adapters (peft) on every peer, the base frozen; scale lora_alpha / lora_rank, dropout 0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: str = "all-linear"  # every linear layer but the LM head, or module names: "q_proj,v_proj"
    # schedule
    rounds: int = 24                  # T: every block is activated once per round
    inner_steps: int = 8              # R: local steps (and exchanges) per activation; at equal steps R = 4 and 8
                                      # beat 16 (finetune.md ablation); 8 keeps block switches and checkpoints fewer
    block_order: str = "ascending"    # ascending | descending | random (seeded, identical on every peer)
    embeddings_block: bool = False    # train the embeddings as an extra block (off: fine-tuning a pretrained base, as BAdam)
    head_block: bool = False          # train final norm + LM head as an extra block
    layers_per_block: int = 1         # consecutive decoder layers per block (the paper found one best)
    # data
    batch_size: int = 16
    grad_accum: int = 1               # micro-batches of batch_size per local step (their gradients averaged)
    alpha: float = 0.25               # Dirichlet concentration of the non-IID split (embedded data, `split`)
    train_per_task: int = 2000
    eval_per_task: int = 40
    max_len: int = 0                  # tokens per sequence; 0: the model's position limit, capped at 1024 on CPU, 4096 on GPU
    eval_fraction: float = 0.1        # without --eval-data, this share of a peer's own file is held out for its evaluation
    eval_batch_size: int = 0          # sequences per evaluation batch; 0: batch_size (keeps evaluation within a step's memory)
    eval_max_new_tokens: int = 64     # exact match is scored on answers of at most this many tokens
    seed: int = 0
    # fine-tuning controls (HF Trainer's names); the defaults keep the benchmarked behaviour of the embedded model
    lr_schedule: str = "constant"     # constant | linear | cosine (transformers.get_scheduler, over the whole run)
    warmup_steps: int = 0             # linear warm-up over the first N local steps of the run ...
    warmup_ratio: float = 0.0         # ... or over this share of them (warmup_steps wins when both are set)
    weight_decay: float = 0.0         # decoupled (AdamW), on matrices only: biases and norms are not decayed
    max_grad_norm: float = 0.0        # clip the active block's gradient norm; 0: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward (the model's gradient_checkpointing_enable)
    # communication
    comm: str = "gossip"              # gossip | none (local-only baseline)
    # send θ at the start of a step and compute its gradient while the blocks travel; the mix's correction lands
    # on θ½ (optim.overlap_correction): a step costs ~max(compute, exchange) instead of their sum
    overlap: bool = False
    codec: str = "raw"                # raw | bf16 | fp16 | int8
    gossip_every: int = 1             # exchange after every c-th inner step (and the last of an activation)
    exchange_timeout_s: float = 60.0  # how long to wait for a neighbour's block before mixing without it
    # robust mixing against a bad neighbour (deca_p2p/robust.py): none | clip (self-centred clipping) | trim.
    # clip (automatic tau) is the default: without an attack it clipped no honest block in-process (ring8 and
    # exp16, the base model: the same weights as none, bit for bit); with a sign-flipping neighbour honest peers
    # ended where leaving it out puts them, against +78% (ring8) / +72% (exp16) mean eval loss with none
    # (benchmarks/results/byzantine.md, real peers)
    robust: str = "clip"
    robust_tau: float = 0.0           # clip radius as a share of the peer's own block norm; 0: automatic (robust.py)
    robust_trim: int = 1              # trim: values dropped per side and coordinate (needs 2b+1 <= degree+1, else clip)
    # the mix's accumulator: float32 (the block's own dtype) or float64; float64 moved results by noise only and
    # cost ~3x the time (benchmarks/results/mix_precision.md)
    mix_dtype: str = "float32"
    robust_exclude: str = ""          # neighbour ids never mixed in ("3,5"), as if always missing: a manual quarantine
    # TEST/BENCHMARK HOOK ONLY (deca_p2p/attacks.py), never for real use: "KIND@ID[,ID...]" makes those peers
    # publish a corrupted block (x10, x1000, constant, signflip, gaussian, dissensus); "" (default): nobody does
    attack: str = ""
    # differential privacy of the shared blocks (deca_p2p/privacy.py): at every exchange the change of the block
    # since the last release is clipped to L2 norm dp_clip and N(0, (dp_noise * dp_clip)^2) noise is added;
    # 0 / 0: off. dp_clip alone clips without noise (epsilon infinite); dp_noise needs dp_clip.
    dp_noise: float = 0.0             # sigma, the noise multiplier (noise std / clip radius)
    dp_clip: float = 0.0              # C, the clip radius of the block change
    dp_delta: float = 1e-5            # delta of the reported (epsilon, delta)
    dp_seed: int | None = None        # None: noise from OS randomness; an int makes it reproducible (tests only)
    hello_timeout_s: float = 60.0
    base_port: int = 5550             # peer i listens on tcp://127.0.0.1:(base_port + i) without a bootstrap file
    # runtime
    dtype: str = "float32"            # model working dtype: float32 | bfloat16 | float16 (fp32 master copy of the active block)
    device: str = "cpu"               # cpu | cuda | auto
    threads: int = 0                  # torch threads per peer (0: cores / peers, at least 1)
    time_slice_ms: float = 30.0       # training thread's CPU slice but while waiting (timeslice.py; Linux >= 6.12; 0: kernel's)
    io_time_slice: str = "auto"       # ZeroMQ's I/O thread gets that slice too: always | never | auto (where no link is emulated)
    eval_every: int = 16              # evaluate every N activations (0: at the end of each round), and at the end
    checkpoint_every: int = 1         # atomic checkpoint every N activations (and at the end of each round)
    resume: bool = True               # a restarted peer resumes from its latest checkpoint in the run dir
    slowdown: float = 1.0             # >1 makes this peer a straggler on purpose (tests and demos)
    secure: bool = False              # ZeroMQ CURVE: encrypted links, senders identified by their key
    keys_dir: str = "keys"            # where `deca-peer keys` put the secret keys (never in the bootstrap file)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        choices = {"algo": ("deca", "dadam", "dsgd", "declora"), "discrepancy": ("paper", "qg", "consensus", "none"),
                   "block_order": ("ascending", "descending", "random"), "comm": ("gossip", "none"),
                   "codec": ("raw", "bf16", "fp16", "int8"), "dtype": ("float32", "bfloat16", "float16"),
                   "device": ("cpu", "cuda", "auto"), "lr_schedule": LR_SCHEDULES,
                   "robust": ("none", "clip", "trim"), "mix_dtype": ("float32", "float64"),
                   "io_time_slice": ("auto", "always", "never")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in ("rounds", "inner_steps", "batch_size", "train_per_task", "eval_per_task", "gossip_every",
                    "checkpoint_every", "grad_accum", "eval_max_new_tokens", "layers_per_block",
                    "lora_rank", "lora_alpha"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "alpha", "eps", "exchange_timeout_s", "hello_timeout_s"):
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0 or (v == 0 and key != "lr"):
                raise ConfigError(f"{key} must be a finite number {'>= 0' if key == 'lr' else '> 0'}, got {v}")
        for key in ("alphas", "betas"):
            v = getattr(self, key)
            if len(v) != 2 or not all(0.0 <= x <= 1.0 for x in v) or (key == "betas" and max(v) >= 1.0):
                raise ConfigError(f"{key} must be two numbers in [0, 1{')' if key == 'betas' else ']'}, got {list(v)}")
        if self.lr > MAX_LR:  # Adam's lr / (1 - beta1^t) must stay a float32
            raise ConfigError(f"lr must be at most {MAX_LR:g}, got {self.lr}")
        if self.discrepancy in ("qg", "consensus") and self.lr == 0:
            raise ConfigError(f"discrepancy {self.discrepancy!r} divides by the learning rate, which is 0")
        if not (math.isfinite(self.time_slice_ms) and 0 <= self.time_slice_ms <= 100):
            raise ConfigError(f"time_slice_ms must be in [0, 100] (0: the kernel's default), got {self.time_slice_ms}")
        if not math.isfinite(self.slowdown) or self.slowdown < 1:
            raise ConfigError(f"slowdown must be a factor >= 1, got {self.slowdown}")
        if self.max_len < 0 or self.max_len == 1:
            raise ConfigError(f"max_len must be at least 2 (or 0: from the model), got {self.max_len}")
        for key in ("eval_batch_size", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("eval_fraction", "warmup_ratio"):
            v = getattr(self, key)
            if not (math.isfinite(v) and 0 <= v < 1):
                raise ConfigError(f"{key} must be in [0, 1), got {v}")
        for key in ("weight_decay", "max_grad_norm"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.robust_tau) and self.robust_tau >= 0):
            raise ConfigError(f"robust_tau must be a finite number >= 0 (0: automatic), got {self.robust_tau}")
        for key in ("dp_noise", "dp_clip"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0 (0: off), got {v}")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise ConfigError("dp_noise needs dp_clip > 0 (the noise is dp_noise x dp_clip): give --dp-clip too")
        if self.overlap and self.dp_clip > 0:
            raise ConfigError("--overlap cannot be combined with --dp-clip: an overlapped block is sent before its "
                              "step's release is noised")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_seed is not None and (isinstance(self.dp_seed, bool) or not isinstance(self.dp_seed, int)):
            raise ConfigError(f"dp_seed must be an integer (or absent), got {self.dp_seed!r}")
        # a peer's batch generator is seeded with seed * 1_000_003 + id, which torch needs below 2**64
        for key in ("seed", "dp_seed"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < MAX_SEED:
                raise ConfigError(f"{key} must be >= 0 and below 2**32 ({MAX_SEED}), got {v}")
        if not 0 <= self.threads <= MAX_THREADS:  # torch.set_num_threads takes a C int: a huge one is a typo
            raise ConfigError(f"threads must be in [0, {MAX_THREADS}] (0: cores / peers), got {self.threads}")
        if self.robust_trim < 1:
            raise ConfigError(f"robust_trim must be at least 1, got {self.robust_trim}")
        if self.robust_exclude:
            from .robust import parse_ids

            try:
                parse_ids(self.robust_exclude)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.attack:
            from .attacks import parse

            try:
                parse(self.attack)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for key, f in FIELDS.items():
            v = getattr(self, key)
            if key not in ("seed", "dp_seed") and f.type in ("int", "int | None") and isinstance(v, int) \
                    and not isinstance(v, bool) and v > MAX_COUNT:
                raise ConfigError(f"{key} must be at most {MAX_COUNT}, got {v}")
        if not 0 < self.base_port < 65536:
            raise ConfigError(f"base_port must be a TCP port, got {self.base_port}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


OPTIONAL_INTS = ("dp_seed",)  # default None; a value is an int ("none" on the command line: back to None)


def _coerce(key: str, value: Any) -> Any:
    default = getattr(TrainConfig(), key)
    kind = "int" if key in OPTIONAL_INTS else type(default).__name__
    if isinstance(default, str) and isinstance(value, bool):  # YAML reads an unquoted on/off/yes/no so
        raise ConfigError(f"{key}: got the boolean {value} (YAML reads an unquoted on, off, yes or no as one): "
                          f"quote the value, e.g. {key}: \"{default}\"")
    try:
        if key in OPTIONAL_INTS:
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
                return None
            return _int(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
                return bool(value)
            raise ValueError(value)  # `secure: 5` is a typo, not a yes
        if isinstance(default, tuple):
            items = json.loads(value) if isinstance(value, str) else value
            return tuple(float(x) for x in items)
        if isinstance(default, int):
            return _int(value)
        if isinstance(default, float) and isinstance(value, bool):
            raise ValueError(value)  # `lr: true` is not a number
        if isinstance(default, (float, str)):
            return type(default)(value)
    except (TypeError, ValueError, OverflowError, json.JSONDecodeError):
        raise ConfigError(f"{key}: cannot read {value!r} as {kind}") from None
    return value


def _int(value: Any) -> int:
    """An int from an int, a whole finite float (YAML `3.0`) or a string; ValueError for anything else
    (`int()` alone turns 2.7 into 2, true into 1, and .inf into an OverflowError)."""
    if isinstance(value, bool) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(value)
    return int(value)


def make_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- config file (TOML or YAML) <- overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_config_file(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read ({e})") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings at the top level")
    if not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{p}: setting names must be strings")
    return data
