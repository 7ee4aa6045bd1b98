"""What a peer's checkpoints cost, for `deca-peer plan` (plan.py): the bytes each save writes and its seconds, and the
disk calibration behind `plan --calibrate`.

A peer checkpoints after every activation (`checkpoint_every`, and at the end of each round; checkpoint.save_atomic).
What it writes, as checkpoint.py and checkpoint_reuse.py do:

* **DECA**: block-sharded; a later save rewrites the shards of the blocks trained since the last save (one, with the
  default `checkpoint_every` of 1) and hard-links every other file: blocks in the working dtype. A process's first save writes the model twice
  (`save_pretrained`, then the block shards).
* **Decentralized Adam**: its one block is every parameter, so every save rewrites the whole model; the first one
  twice, as above.
* **Dec-LoRA**: every save exports a new merged model (`save_pretrained`) and the adapters in float32.

A save costs a fixed part (fsyncs of its files and directories, the rename, the `latest` swap) and its bytes at the
disk's checkpoint rate (safetensors serialization, write, fsync). Peers that share a host's cores (`make cluster`)
share its disk too, and being synchronous they save at about the same time: their bytes add up. Not modelled: the one
read-back of the last checkpoint at the end of a run (usually from the page cache), the tokenizer's files, and
the time of Dec-LoRA's merge before each save (its memory, a copy of the whole model, is plan.memory's
"checkpoint" phase).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .plan_arch import DTYPE_BYTES, Arch, BlockCost, PlanError, total_params


def save_bytes(a: Arch, method: str, blocks: list[BlockCost], dtype: str) -> tuple[list[float], float]:
    """(bytes a later save writes with each block active, bytes of a process's first save)."""
    model = DTYPE_BYTES[dtype] * total_params(a)
    if method == "deca":
        return [DTYPE_BYTES[dtype] * b.params for b in blocks], 2.0 * model
    if method == "dadam":
        return [model], 2.0 * model
    if method == "declora":  # the merged model and the float32 adapters, every time
        return [model + 4.0 * blocks[0].params], model + 4.0 * blocks[0].params
    raise PlanError(f"unknown method {method!r}")


def saves_per_run(method: str, n_blocks: int, rounds: int, checkpoint_every: int) -> int:
    """Checkpoints in a run of ROUNDS rounds of N_BLOCKS activations: after every CHECKPOINT_EVERY-th activation,
    counted over the run (peer.py), and after each round's last. The baselines' rounds are one activation long
    (trainer.make_schedule), so they save after every activation."""
    if method != "deca":
        return n_blocks * rounds
    return sum(1 for a in range(n_blocks * rounds) if (a + 1) % checkpoint_every == 0 or (a + 1) % n_blocks == 0)


def save_seconds(nbytes: float, disk_bw: float, fixed_s: float, writers: int = 1) -> float:
    """One save of NBYTES while WRITERS peers write as much to the same disk."""
    return fixed_s + writers * nbytes / disk_bw


def checkpoint_cost(method: str, later: list[float], first: float, n_blocks: int, rounds: int, checkpoint_every: int,
                    disk_bw: float, fixed_s: float, writers: int = 1) -> dict[str, float]:
    """Per round (means over the run): saves, bytes written and seconds; seconds per save; and what a process's first
    save adds once. A DECA save rewrites the shards of every block trained since the last one, so over a round each
    block is written once whatever CHECKPOINT_EVERY; a baseline's save writes its whole model after every activation.
    WRITERS peers write as much to the same disk at the same time."""
    saves = saves_per_run(method, n_blocks, rounds, checkpoint_every) / rounds
    written = sum(later) if method == "deca" else n_blocks * later[0]
    seconds = saves * save_seconds(written / saves, disk_bw, fixed_s, writers)
    return {"saves_per_round": saves, "bytes_per_round": written, "seconds_per_round": seconds,
            "seconds_per_save": seconds / saves, "bytes_per_save": written / saves,
            "first_extra_s": writers * max(0.0, first - written / saves) / disk_bw}


def calibrate_disk(directory: str | Path = ".", reps: int = 5) -> tuple[float, float]:
    """(bytes/s, fixed seconds) of this peer code's own checkpoints in DIRECTORY: a two-layer Llama (one 67 MB layer,
    float32) saved block-sharded with checkpoint.save_atomic, then saved again with only its final norm changed (the
    fixed part: a 4 kB shard and a peer's 25 kB state file written, every other file linked) and with one layer
    changed (its shard written). Medians of REPS. PlanError where it cannot write there, or where the file system has
    no hard links (then every save writes every file: no rate of this kind describes it)."""
    import shutil
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .checkpoint import latest, save_atomic
    from .checkpoint_reuse import INDEX

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(cfg)
    # a shard of one layer, and one of a 4 kB norm: the fixed part includes a written file's fsync
    groups = [tuple(n for n, _ in model.named_parameters() if "layers.0." in n), ("model.norm.weight",)]
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in set(groups[0]))
    try:
        root = Path(tempfile.mkdtemp(prefix=".deca-plan-disk-", dir=directory))
    except OSError as e:
        raise PlanError(f"--calibrate times checkpoint writes in {directory}, which it cannot write to ({e.strerror}); "
                        "run it where the peers' run directories will be, or give --disk-bw") from None
    try:
        # a peer's own state file beside the weights (peer._checkpoint: its data generator's state, ~25 kB)
        extra = {"deca_state.json": json.dumps({"activation": 0, "batcher_generator": list(range(5056))})}
        save_atomic(model, None, root, "first", extra, groups=groups)
        index = latest(root) / INDEX
        inode = index.stat().st_ino

        def timed(changed) -> float:
            t0 = time.perf_counter()
            save_atomic(model, None, root, "again", extra, groups=groups, changed=changed)
            return time.perf_counter() - t0

        fixed = statistics.median(timed(groups[1]) for _ in range(reps))
        full = statistics.median(timed(groups[0]) for _ in range(reps))
        index = latest(root) / INDEX
        if not index.is_file() or index.stat().st_ino != inode:  # every save wrote every file
            raise PlanError(f"{directory} is on a file system without hard links, where a peer's every checkpoint "
                            "writes the whole model; give --disk-bw (its write rate) instead of timing it")
    except OSError as e:
        raise PlanError(f"--calibrate could not time checkpoint writes in {directory} ({e}); give --disk-bw") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return nbytes / max(full - fixed, 1e-6), fixed
