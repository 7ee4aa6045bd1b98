"""What the benchmark scripts share: where results go, a description of the machine, child processes."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine_facts() -> str:
    """Cores, CPU model, RAM, kernel, glibc, THP mode and the library versions that matter for the numbers."""
    import numpy
    import psutil
    import torch
    import transformers
    import zmq

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Linux "
            f"{platform.release()}, glibc {platform.libc_ver()[1]}, THP `{thp}`; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}, "
            f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}")


def spawn(script: str | Path, args: list[str], env_extra: dict[str, str] | None = None,
          env_drop: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``python script args...`` as a child (stdout piped, text) with this checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)



def reap(procs) -> None:
    """Kill and wait for any of these child processes still running (a benchmark that failed or timed out)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()

# ----------------------------------------------------------------------------------------- models from a config

CACHE = ROOT / ".deca-cache" / "bench-models"


def build_random_model(name: str, arch: dict, *, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0,
                       cache: Path = CACHE) -> Path:
    """A model directory with the architecture `arch` (an HF config dict with its ``model_type``; e.g.
    deca_p2p.plan.PRESETS[...]), random weights in `dtype`, and the embedded character tokenizer (its ids fit any
    table), built once into `cache`/`name` (git-ignored) and reused. Nothing is downloaded. `device` = where the
    weights are initialised ("cuda" makes an 8 B model in seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deca_p2p.models import _build_tokenizer

    path = cache / name
    if (path / "config.json").is_file():
        return path
    tok = _build_tokenizer()
    arch = dict(arch)
    cfg = AutoConfig.for_model(arch.pop("model_type"), **arch, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):  # initialised in the target dtype: no float32 copy of an 8 B model
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model = model.to(torch_dtype)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # this (parent) process keeps no GPU memory for the peers it starts next
    os.replace(tmp, path)
    return path


def complete2_topology(path: Path) -> Path:
    """Two peers, one link (no emulation): the smallest real network."""
    import json

    path.write_text(json.dumps({"name": "complete2", "nodes": [0, 1], "edges": [[0, 1]], "weights": "metropolis"}))
    return path


def step_split(run_dir: str | Path, ids=(0, 1)) -> dict:
    """Mean seconds per inner step over the peers' exchange steps, from their metrics: compute (forward, backward,
    optimizer step), encode (copy to host, delta against the public copy, codec), wire (waiting for the neighbours:
    the whole exchange minus encode and mix), mix (the weighted sum), apply (BMA and copy back); the bytes of one
    message to one neighbour; the peers' final records."""
    import statistics

    from deca_p2p.metrics import records

    steps = [r for i in ids for r in records(run_dir, i, "step") if r.get("wait_s") is not None]
    finals = [rs[0] for i in ids if (rs := records(run_dir, i, "final"))]
    links = [v[0] for r in steps for v in (r.get("links") or {}).values() if v and v[0]]

    def mean(key):
        return statistics.mean(r.get(key) or 0.0 for r in steps) if steps else 0.0

    wait, enc, mix = mean("wait_s"), mean("encode_s"), mean("mix_s")
    return {"peers": len(ids), "steps": len(steps) // max(1, len(ids)),
            "bytes_per_exchange": statistics.mean(links) if links else 0,
            "compute_s": mean("compute_s"), "encode_s": enc, "wire_s": max(0.0, wait - enc - mix), "mix_s": mix,
            "apply_s": mean("apply_s"), "finals": finals}
