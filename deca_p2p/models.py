"""The model side: load any local Hugging Face causal LM (never from a hub), and the embedded default.

The embedded default model is the shipped *base*: a small LLaMA-architecture causal LM with a character-level
tokenizer, pretrained centrally on the pretraining task family (``tasks.PRETRAIN_TASKS``) by
``scripts/pretrain_base.py`` and packaged in Hugging Face format in ``deca_p2p/base_model/`` (see its README.md),
so that ``AutoModelForCausalLM`` / ``AutoTokenizer`` read it like any other model. Peers fine-tune it on the
disjoint fine-tuning family (``tasks.TASKS``). Nothing is trained or downloaded at install or run time.
:func:`build_default_model` still writes the same architecture randomly initialised (the pretraining script's
starting point, and a from-scratch reference). ``transformers`` and ``tokenizers`` are imported lazily, so
importing this module is cheap.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .paths import BASE_MODEL_DIR


class ModelError(ValueError):
    """A model path that cannot be used as a causal LM (missing, no config.json, unreadable weights, wrong kind)."""


# --------------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------------

# BASE_MODEL_DIR (paths.py): the packaged pretrained base, named where importing it does not import torch

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# Every printable ASCII character plus newline and tab: covers the tasks and most user JSONL.
_CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
_VOCAB: dict[str, int] = {t: i for i, t in enumerate(_SPECIAL_TOKENS + _CHARS)}

# The architecture of the shipped base (and of build_default_model). Changing it or the vocabulary means
# re-running scripts/pretrain_base.py (tests/test_base_model.py checks that the two agree).
DEFAULT_MODEL_CONFIG: dict = dict(
    vocab_size=len(_VOCAB),
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    pad_token_id=_VOCAB["<pad>"],
    bos_token_id=_VOCAB["<s>"],
    eos_token_id=_VOCAB["</s>"],
)


def _build_tokenizer():
    """The character-level tokenizer of the default model, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(_VOCAB), unk_token="<unk>"))
    # One pre-token per character (``[\s\S]``: unlike ``.``, it also matches newlines); spaces are kept.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_MODEL_CONFIG["max_position_embeddings"],
    )


def build_default_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write an *untrained* model of the default architecture (random init from ``seed``) and its tokenizer to
    ``path`` in HF format: the starting point of ``scripts/pretrain_base.py``, and a from-scratch reference.

    The directory is built next to ``path`` and renamed into place, so readers never see a partial
    model. If ``path`` already holds a model (e.g. another process won the race), it is kept as is.
    The same seed gives bit-identical weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _build_tokenizer().save_pretrained(tmp)
        config = LlamaConfig(**DEFAULT_MODEL_CONFIG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.to(torch.float32)
        with QuietProgress():
            model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if not (path / "config.json").exists():
                raise ModelError(
                    f"model path {path} exists but is not a model directory ({e.strerror}); remove it"
                ) from None
            # another process renamed its build into place first: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_model_path() -> Path:
    """The embedded default model: the pretrained base packaged with the library (``deca_p2p/base_model``)."""
    return BASE_MODEL_DIR


def ensure_default_model() -> Path:
    """Return :func:`default_model_path` after checking the packaged base is there (nothing is built or fetched)."""
    path = default_model_path()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelError(f"the packaged base model at {path} is incomplete (no {', '.join(missing)}); reinstall "
                         f"deca-p2p, or rebuild it with scripts/pretrain_base.py")
    return path


class QuietProgress:
    """Temporarily turn off transformers' progress bars (restored on exit)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        if self._was:
            hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()
        return False


def _zero_dropout_config(config) -> None:
    for key, val in list(vars(config).items()):
        if isinstance(val, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load ``(model, tokenizer)`` from a local Hugging Face directory (never from the hub).

    The model is returned in train mode with every dropout probability set to 0. The tokenizer has
    an EOS token and a pad token (the EOS token when the tokenizer defines none). Raises
    :class:`ModelError` (one line) for a missing path, a directory without ``config.json``, weights that cannot
    be read or do not match ``config.json``, a model that is not a causal LM or has no stack of decoder layers,
    or a tokenizer whose ids do not fit the model's input-embedding table. transformers' load report (missing
    or unexpected keys) is printed only once the model is usable.

    "Causal LM" is decided by two rules, both required:

    * static: ``AutoModelForCausalLM`` must accept the config and ``config.is_encoder_decoder`` must not be set;
    * empirical (:func:`check_causal`): on one short probe, the logits at earlier positions must not depend on
      later tokens. This is the property training relies on, whatever the class is called: it rejects e.g. a
      BERT directory (``AutoModelForCausalLM`` builds ``BertLMHeadModel``, bidirectional unless
      ``is_decoder`` is set) and accepts a BERT configured as a decoder.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"model path {path} is not a Hugging Face causal LM directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a usable model dir"
        raise ModelError(f"model path {path}: cannot read config.json ({_one_line(e)})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model path {path} is an encoder-decoder model ({config.model_type}), not a causal LM")
    _zero_dropout_config(config)
    held: list[logging.LogRecord] = []
    try:
        with QuietProgress(), _HeldLogs(held):
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, local_files_only=True
            )
    except RuntimeError as e:  # transformers: shapes in the file differ from those config.json builds
        mismatch = _first_mismatch(held)
        if mismatch or "mismatch" in str(e):
            raise ModelError(f"model path {path}: its weights do not match its config.json "
                             f"({mismatch or _one_line(e)})") from None
        raise ModelError(f"model path {path}: cannot load weights ({_one_line(e)})") from None
    except ValueError as e:
        raise ModelError(f"model path {path} is not a causal LM ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - OSError, a corrupt safetensors file (SafetensorError), ...
        raise ModelError(f"model path {path}: cannot load weights ({_one_line(e)})") from None
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    check_causal(model, where=f"model path {path}")  # on the CPU copy, before any move: exact and deterministic
    from .blocks import find_layers

    try:  # DECA's blocks are its decoder layers: a model without them (num_hidden_layers <= 0) is no LM to tune
        find_layers(model)
    except ValueError as e:
        raise ModelError(f"model path {path} has no decoder layers (num_hidden_layers "
                         f"{getattr(config, 'num_hidden_layers', '?')} in config.json; {_one_line(e)})") from None
    model.to(device)
    model.train()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model path {path}: cannot load tokenizer ({_one_line(e)})") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model path {path}: tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_vocab_fits(model, tokenizer, where=f"model path {path}")
    for record in held:  # the model is usable: now show what transformers had to say about loading it
        logging.getLogger(record.name).handle(record)
    return model, tokenizer


# Where transformers logs its LOAD REPORT (modeling_utils passes its own logger; loading_report's is the default)
_LOAD_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")


class _HeldLogs(logging.Filter):
    """Keep the records of the loggers in _LOAD_LOGGERS in `held` instead of printing them: a failed load then
    ends with one line, not a page-long LOAD REPORT above it; the caller re-emits them once the load succeeds."""

    def __init__(self, held: list):
        super().__init__()
        self.held = held

    def filter(self, record):
        self.held.append(record)
        return False

    def __enter__(self):
        for name in _LOAD_LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in _LOAD_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        return False


def _first_mismatch(records) -> str:
    """The first size mismatch of a held LOAD REPORT, in words ("" when there is none)."""
    import re

    for record in records:
        rows = [r for r in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines() if "ckpt:" in r]
        for row in sorted(rows):  # the report's order is a set's: name the same one every time
            m = re.search(r"ckpt:\s*torch\.Size\((\[[^\]]*\])\)\s*vs\s*model:\s*torch\.Size\((\[[^\]]*\])\)", row)
            if m:
                return (f"{row.split('|')[0].strip()} is {m.group(1)} in the weights, {m.group(2)} by config.json; "
                        f"{len(rows)} mismatch(es) in all")
    return ""


def check_vocab_fits(model, tokenizer, where: str = "model") -> None:
    """Every token id the tokenizer can produce must index the model's input-embedding table."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        rows = emb.weight.shape[0]
    n_tokens = len(tokenizer)
    max_id = max(tokenizer.get_vocab().values(), default=-1)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            max_id = max(max_id, tid)
    if n_tokens > rows or max_id >= rows:
        raise ModelError(f"{where}: the tokenizer has {n_tokens} tokens (largest id {max_id}) but the model's "
                         f"input-embedding table has only {rows} rows; use the tokenizer the model was trained with")


def check_causal(model, where: str = "model", length: int = 8) -> None:
    """Raise ModelError unless the model's logits at a position ignore every later token.

    Two probe sequences share their first half and differ at every position of the second; a causal model gives
    the same logits on the shared half (exactly, on CPU: the masked attention weights are 0). A bidirectional
    model leaks the change backwards; even at random init the leak is >= 2e-3 of the change seen on the second
    half (BERT, fp32 and bf16), so the threshold is 1e-5 of it. Runs in eval mode without gradients and
    leaves the RNG state and the train/eval mode as they were.
    """
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.vocab_size
    k = length // 2
    device = next(model.parameters()).device
    a = torch.tensor([[(7 * i + 3) % vocab for i in range(length)]], device=device)
    b = a.clone()
    b[0, k:] = (a[0, k:] + 1 + torch.arange(length - k, device=device)) % vocab
    mask = torch.ones_like(a)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            la = model(input_ids=a, attention_mask=mask, use_cache=False).logits.float()
            lb = model(input_ids=b, attention_mask=mask, use_cache=False).logits.float()
    except Exception as e:  # noqa: BLE001 - a model that cannot run a short forward pass cannot be trained
        raise ModelError(f"{where}: a forward pass on {length} tokens failed ({_one_line(e)})") from None
    finally:
        model.train(was_training)
    leak = (la[:, :k] - lb[:, :k]).abs().max().item()
    change = (la[:, k:] - lb[:, k:]).abs().max().item()
    if leak > 1e-5 * change:
        hint = "" if getattr(model.config, "is_decoder", True) else "; is_decoder is not set in its config"
        raise ModelError(f"{where} is not a causal LM: its predictions at a position depend on later tokens "
                         f"({type(model).__name__}{hint})")


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300] + ("..." if len(s) > 300 else "")


def position_limit(model, tokenizer=None) -> int | None:
    """The longest sequence the model's position table takes (config), else the tokenizer's limit, else None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(model.config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 1_000_000 else None
