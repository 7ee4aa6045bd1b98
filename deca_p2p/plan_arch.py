"""The planner's model of an architecture: presets and HF configs, exact parameter counts, blocks as
``blocks.partition`` makes them, and message bytes per codec (deca_p2p/plan.py has the whole model)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


METHODS = ("deca", "dadam", "declora")
CODEC_BYTES = {"raw": 4, "bf16": 2, "fp16": 2, "int8": 1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADER_BASE_BYTES = 150        # msgpack header: fixed keys and stats (estimate, see tests/test_plan.py)
HEADER_TENSOR_BYTES = 85       # per tensor: name (~40 chars), dtype, shape, nbytes (int8: + 10 for its scale)
GiB = 1 << 30


class PlanError(ValueError):
    """Bad input to the planner (unknown preset, unreadable config, bad numbers): one line."""


# ------------------------------------------------------------------------------------------------ architectures

@dataclass(frozen=True)
class Arch:
    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False       # Qwen2: biases on q, k, v
    o_bias: bool = False         # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False        # Qwen3: RMSNorm over each head's q and k
    exact: bool = True           # False: a model_type this formula is not checked against


# Published configurations (the models' config.json on the Hugging Face hub).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
EXACT_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def arch_from_config(cfg: dict[str, Any], name: str) -> Arch:
    """An Arch from an HF config dict (Llama-family keys)."""
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if missing:
        raise PlanError(f"{name}: config lacks integer {', '.join(missing)} (the planner reads Llama-family "
                        f"decoder configs: llama, mistral, qwen2, qwen3)")
    mt = str(cfg.get("model_type", "llama"))
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    vals = dict(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                heads=heads, kv_heads=kv, head_dim=hd, vocab=cfg["vocab_size"])
    for k, v in vals.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{name}: {k} must be a positive integer, got {v!r}")
    if heads % kv:
        raise PlanError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    attn_bias = bool(cfg.get("attention_bias", False))
    return Arch(name=name, model_type=mt, tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=mt == "qwen2" or attn_bias, o_bias=attn_bias and mt != "qwen2",
                mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3", exact=mt in EXACT_TYPES, **vals)


def load_arch(spec: str) -> Arch:
    """A preset name (case-insensitive), a config.json, or a model directory holding one."""
    key = spec.strip().lower()
    if key in PRESETS:
        return arch_from_config(PRESETS[key], key)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        if p.suffix != ".json" and "/" not in spec:
            raise PlanError(f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}) or a path to an HF "
                            "config.json (or a model directory)")
        raise PlanError(f"model config {p} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{p}: not a readable JSON config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{p}: expected a JSON object")
    cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"}) \
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
    return arch_from_config(cfg, str(spec))


# ------------------------------------------------------------------------------------------------ parameter counts

def _linears(a: Arch) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, has_bias) of one decoder layer's linear layers."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return [("q_proj", a.hidden, q, a.qkv_bias), ("k_proj", a.hidden, kv, a.qkv_bias),
            ("v_proj", a.hidden, kv, a.qkv_bias), ("o_proj", q, a.hidden, a.o_bias),
            ("gate_proj", a.hidden, a.intermediate, a.mlp_bias), ("up_proj", a.hidden, a.intermediate, a.mlp_bias),
            ("down_proj", a.intermediate, a.hidden, a.mlp_bias)]


def layer_tensors(a: Arch) -> list[int]:
    """Element counts of one decoder layer's parameter tensors."""
    out = []
    for _, i, o, bias in _linears(a):
        out.append(i * o)
        if bias:
            out.append(o)
    out += [a.hidden, a.hidden]  # input and post-attention RMSNorm
    if a.qk_norm:
        out += [a.head_dim, a.head_dim]
    return out


def layer_params(a: Arch) -> int:
    return sum(layer_tensors(a))


def embedding_params(a: Arch) -> int:
    return a.vocab * a.hidden


def head_params(a: Arch) -> int:
    """Final norm + the LM head (0 for the head when tied: it is the embedding matrix)."""
    return a.hidden + (0 if a.tied else a.vocab * a.hidden)


def total_params(a: Arch) -> int:
    return embedding_params(a) + a.layers * layer_params(a) + head_params(a)


def lora_layer_params(a: Arch, rank: int) -> int:
    """peft LoRA on every linear layer of a decoder layer: A (r x in) + B (out x r) each."""
    return sum(rank * (i + o) for _, i, o, _ in _linears(a))


@dataclass
class BlockCost:
    name: str
    params: int
    tensors: int
    largest: int          # elements of its largest tensor
    layers: tuple[int, int] | None = None  # decoder layers [first, last) it holds


def make_blocks(a: Arch, method: str, *, embeddings_block: bool = False, head_block: bool = False,
                layers_per_block: int = 1, lora_rank: int = 8) -> list[BlockCost]:
    """The blocks a peer trains (frozen blocks are not listed), as blocks.partition / trainer.make_blocks."""
    lt = layer_tensors(a)
    if method == "dadam":
        tensors = [embedding_params(a)] + lt * a.layers + [a.hidden] + ([] if a.tied else [a.vocab * a.hidden])
        return [BlockCost("all", total_params(a), len(tensors), max(tensors), (0, a.layers))]
    if method == "declora":
        per = lora_layer_params(a, lora_rank)
        largest = max(rank_t for _, i, o, _ in _linears(a) for rank_t in (lora_rank * i, lora_rank * o))
        return [BlockCost("lora", per * a.layers, 14 * a.layers, largest, (0, a.layers))]
    if method != "deca":
        raise PlanError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    if layers_per_block < 1:
        raise PlanError(f"layers_per_block must be at least 1, got {layers_per_block}")
    out = []
    if embeddings_block:
        out.append(BlockCost("embeddings", embedding_params(a), 1, embedding_params(a), None))
    for i in range(0, a.layers, layers_per_block):
        n = min(layers_per_block, a.layers - i)
        name = f"layer.{i}" if layers_per_block == 1 else f"layers.{i}-{i + n - 1}"
        out.append(BlockCost(name, n * layer_params(a), n * len(lt), max(lt), (i, i + n)))
    if head_block:
        hp = head_params(a)
        out.append(BlockCost("head", hp, 1 if a.tied else 2, a.hidden if a.tied else a.vocab * a.hidden,
                             (a.layers, a.layers)))
    return out


def message_bytes(block: BlockCost, codec: str) -> int:
    """One block message on the wire: payload by codec + an estimated msgpack header."""
    if codec not in CODEC_BYTES:
        raise PlanError(f"unknown codec {codec!r}; choose {', '.join(CODEC_BYTES)}")
    per_tensor = HEADER_TENSOR_BYTES + (10 if codec == "int8" else 0)
    return block.params * CODEC_BYTES[codec] + HEADER_BASE_BYTES + block.tensors * per_tensor


