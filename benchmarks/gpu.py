"""The GPU check, one prepared script for a device machine (one GPU, no internet; models built from their published
configurations with random weights, nothing downloaded).

1. Two real peers on the GPU with the architecture of Llama-3.2-1B (1.24 B parameters, tied embeddings), bf16
   working dtype, batch 2 x 512 tokens, raw codec, complete 2 over 127.0.0.1: DECA vs decentralized Adam vs
   Dec-LoRA. Per method: peak GPU memory per peer (torch.cuda.max_memory_allocated, and reserved), seconds per
   step split into compute (forward, backward, optimizer step), copy to host + encode, wire, mix, apply, from the
   peers' metrics (as benchmarks/realistic_size.py reads them); and the plan's prediction (deca_p2p/plan.py).
2. Two DECA peers with the architecture of Llama-3-8B (8.03 B parameters), bf16, batch 2 x 512 tokens, gradient
   checkpointing, gossiping with each other: peak GPU memory per peer (BAdam fine-tunes this model in 23.5 GB on
   one GPU; target: under 24 GB while gossiping).

Each peer is its own process running the real peer (`deca_p2p.peer.run_peer`, what `deca-peer start` runs), started
by this script rather than by `deca-peer cluster` so that it can read torch.cuda.max_memory_allocated() in the peer's
own process at the end. Checkpoints are not written (they would time the disk: 16 GB per 8 B peer).

    .venv/bin/python benchmarks/gpu.py               # on a GPU machine: ~6 min; writes benchmarks/results/gpu.md
    .venv/bin/python benchmarks/gpu.py --cpu-smoke   # tiny configs on the CPU, the same code path, < 1 min

Without CUDA (and without --cpu-smoke) it says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, build_random_model, complete2_topology, machine_facts, step_split

sys.path.insert(0, str(ROOT))
from deca_p2p import plan  # noqa: E402  (no torch at import)

GiB = 1 << 30
DEADLINE_S = 7.5 * 60  # the whole script, on a device machine
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
TINY_UNTIED = dict(TINY, num_hidden_layers=3, tie_word_embeddings=False)

# name, model preset (or tiny config), methods, settings
RUNS_GPU = [  # the 8 B check first: it is the headline, and the time budget cannot then cut it
    ("llama-3-8b", "llama-3-8b", ("deca",),
     dict(batch_size=2, max_len=512, rounds=1, inner_steps=1, gradient_checkpointing=True)),
    ("llama-3.2-1b", "llama-3.2-1b", ("deca", "dadam", "declora"),
     dict(batch_size=2, max_len=512, rounds=1, inner_steps=2, gradient_checkpointing=False, dadam_steps=4)),
]
RUNS_SMOKE = [
    ("tiny untied (stands in for llama-3-8b)", TINY_UNTIED, ("deca",),
     dict(batch_size=2, max_len=64, rounds=1, inner_steps=1, gradient_checkpointing=True)),
    ("tiny (stands in for llama-3.2-1b)", TINY, ("deca", "dadam", "declora"),
     dict(batch_size=2, max_len=64, rounds=1, inner_steps=2, gradient_checkpointing=False, dadam_steps=2)),
]


def write_data(root: Path, chars: int) -> Path:
    """Each peer's own file of plain-text records longer than the sequence cut (every batch is full length), and a
    tiny common eval set (the peer evaluates before and after training)."""
    import random

    root.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz "
    for i in (0, 1):
        rng = random.Random(i)
        with open(root / f"peer-{i}.jsonl", "w") as f:
            for _ in range(64):
                f.write(json.dumps({"text": "".join(rng.choice(letters) for _ in range(chars)), "label": "t"}) + "\n")
    with open(root / "eval.jsonl", "w") as f:
        for k in range(2):
            f.write(json.dumps({"prompt": f"copy {k}: ab", "completion": "ab", "label": "t"}) + "\n")
    return root


# ----------------------------------------------------------------------------------------- one peer (child process)

def peer_child(spec: dict) -> None:
    """Run one real peer, then write what this process's allocator saw at its peak."""
    import resource

    import torch

    from deca_p2p import peer as peer_mod
    from deca_p2p.config import make_config
    from deca_p2p.peer import PeerArgs, run_peer

    peer_mod._checkpoint = lambda *a, **k: None  # benchmark only: no checkpoint writes (they time the disk)
    cfg = make_config(None, spec["cfg"])
    i = spec["id"]
    data = Path(spec["data"])
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_peer(PeerArgs(i, spec["topology"], spec["run"], cfg, None, spec["model"], str(data / f"peer-{i}.jsonl"),
                      str(data / "eval.jsonl")))
    out = {"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cfg.device == "cuda":
        out.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved(),
                   device=torch.cuda.get_device_name())
    Path(spec["run"], f"peer-{i}", "memory.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent

def start_pair(name: str, method: str, model: Path, data: Path, work: Path, settings: dict, device: str,
               threads: int) -> dict:
    """Start the two peer processes of one run."""
    from deca_p2p.bootstrap import free_base_port

    topo = complete2_topology(work / "c2.json")
    run = work / ("run-" + "".join(c if c.isalnum() else "_" for c in name) + f"-{method}")
    steps = settings["inner_steps"] if method == "deca" else settings.get("dadam_steps", settings["inner_steps"])
    cfg = dict(algo=method, dtype="bfloat16", device=device, rounds=settings["rounds"], inner_steps=steps,
               batch_size=settings["batch_size"], max_len=settings["max_len"], eval_batch_size=2,
               eval_max_new_tokens=2, threads=threads, base_port=free_base_port(2), exchange_timeout_s=600.0,
               hello_timeout_s=600.0, eval_every=100000, checkpoint_every=100000, resume=False,
               gradient_checkpointing=settings["gradient_checkpointing"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, __file__, "--peer", json.dumps(
        {"id": i, "cfg": cfg, "topology": str(topo), "run": str(run), "model": str(model), "data": str(data)})],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    return {"procs": procs, "run": run, "t0": time.perf_counter()}


def finish_pair(h: dict, timeout: float) -> dict:
    """Wait for both peers (killing them past `timeout` s from their start); the step split and peak memory."""
    procs, run, t0 = h["procs"], h["run"], h["t0"]
    error = None
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.communicate()
            out, error = "", f"timed out after {timeout:.0f} s"
        if p.returncode and error is None:
            error = (out.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300]
    wall = time.perf_counter() - t0
    if error:
        return {"error": error, "wall_s": wall}
    split = step_split(run, (0, 1))
    split.pop("finals")
    mems = [json.loads((run / f"peer-{i}" / "memory.json").read_text()) for i in (0, 1)]
    return {**split, "wall_s": wall, "memory": mems}


def predict(arch_spec, method: str, settings: dict, on_gpu: bool) -> dict:
    """The plan's prediction for the same setting: peak device memory of a degree-1 peer, bytes per exchange."""
    a = plan.arch_from_config(arch_spec, "x") if isinstance(arch_spec, dict) else plan.load_arch(arch_spec)
    blocks = plan.make_blocks(a, method)
    tokens = settings["batch_size"] * settings["max_len"]
    mem = plan.memory(a, method, blocks, 1, tokens, "bfloat16", on_gpu, plan.DEVICES["cpu"].runtime_bytes,
                      checkpointing=settings["gradient_checkpointing"])
    return {"params": plan.total_params(a), "memory_bytes": mem.device_bytes, "host_bytes": mem.host_bytes,
            "bytes_per_exchange": max(plan.message_bytes(b, "raw") for b in blocks), "phase": mem.parts["peak_phase"]}


def report(rows: list[dict], smoke: bool, wall: float) -> list[str]:
    gpu = not smoke
    mem_col = "peak GPU allocated / peer (GiB)" if gpu else "peak RSS / peer (GiB)"
    L = ["# GPU: two real peers on one GPU" + (" -- CPU smoke run (tiny configs; not a measurement)" if smoke else ""),
         "", f"`.venv/bin/python benchmarks/gpu.py{' --cpu-smoke' if smoke else ''}`: {wall:.0f} s.", "",
         f"Machine: {machine_facts()}", "",
         "Models built from their published configurations, random weights, bf16 working dtype; the embedded "
         "character tokenizer drives them (plain-text records longer than the cut: every sequence is full length). "
         "Two `deca_p2p.peer.run_peer` processes (what `deca-peer start` runs) on complete 2 over 127.0.0.1, raw "
         "codec; checkpoints off. Per step (means over both peers' exchange steps, from their metrics): compute = "
         "forward + backward + optimizer step (on a GPU the optimizer's kernels may still run when the timer stops: "
         "the copy to host that follows waits for them); encode = copy of the block to host memory, delta against "
         "the public copy, codec; wire = waiting for the neighbour; mix = the weighted sum (public copies moved to "
         "the GPU); apply = BMA and copy back. Predicted = `deca-peer plan`'s memory model for the same setting.", "",
         f"| model | method | params | batch | steps | bytes / exchange | compute s | encode s | wire s | mix s | "
         f"apply s | {mem_col} | reserved GiB | predicted GiB (phase) | note |",
         "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        pr = r["predicted"]
        head = (f"| {r['name']} | {r['method']} | {pr['params'] / 1e9:.3g} B | {r['settings']['batch_size']} x "
                f"{r['settings']['max_len']}{' ckpt' if r['settings']['gradient_checkpointing'] else ''} |")
        if "error" in r:
            L.append(f"{head} | | | | | | | | | {pr['memory_bytes'] / GiB:.1f} ({pr['phase']}) | failed: {r['error']} |")
            continue
        mems = r["memory"]
        peak = max(m.get("max_allocated", m["maxrss_bytes"]) for m in mems)
        res = max(m.get("max_reserved", 0) for m in mems)
        note = ""
        if r["name"].startswith("llama-3-8b") and gpu:
            note = f"target < 24 GB: {'met' if peak < 24e9 else 'missed'} ({peak / 1e9:.1f} GB)"
        L.append(f"{head} {r['steps']} | {r['bytes_per_exchange'] / 1e6:.1f} MB | {r['compute_s']:.3f} | "
                 f"{r['encode_s']:.3f} | {r['wire_s']:.3f} | {r['mix_s']:.3f} | {r['apply_s']:.3f} | "
                 f"{peak / GiB:.2f} | {res / GiB:.2f} | {pr['memory_bytes'] / GiB:.1f} ({pr['phase']}) | {note} |")
    return L


def _say(r: dict) -> None:
    print(f"  {r['name']} {r['method']}: " + (r.get("error") or
          f"compute {r['compute_s']:.3f} s, encode {r['encode_s']:.3f}, wire {r['wire_s']:.3f}, mix {r['mix_s']:.3f}, "
          f"peak {max(m.get('max_allocated', m['maxrss_bytes']) for m in r['memory']) / GiB:.2f} GiB, "
          f"{r['wall_s']:.0f} s"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: the same code path, < 1 min")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        peer_child(json.loads(args.peer))
        return
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here (torch.cuda.is_available() is False): nothing run; "
              "`--cpu-smoke` runs the same code path on tiny configs", file=sys.stderr)
        raise SystemExit(2)
    smoke = args.cpu_smoke
    t_start = time.perf_counter()
    device = "cpu" if smoke else "cuda"
    threads = 1 if smoke else max(1, (os.cpu_count() or 2) // 2)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-")) if smoke else CACHE / "gpu-work"
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work / "data", 96 if smoke else 600)
    rows, pending = [], []
    for name, spec, methods, settings in (RUNS_SMOKE if smoke else RUNS_GPU):
        arch = dict(spec) if isinstance(spec, dict) else dict(plan.PRESETS[spec])
        model_name = ("smoke-" + "-".join(f"{k}{v}" for k, v in sorted(arch.items()) if k != "model_type")) \
            if smoke else f"{spec}-arch"
        t_build = time.perf_counter()
        model = build_random_model(model_name, arch, dtype="bfloat16", device=device,
                                   cache=work / "models" if smoke else CACHE)
        print(f"{name}: model ready in {time.perf_counter() - t_build:.0f} s ({model})", flush=True)
        for method in methods:
            r = {"name": name, "method": method, "settings": settings,
                 "predicted": predict(spec, method, settings, on_gpu=not smoke)}
            rows.append(r)
            left = DEADLINE_S - (time.perf_counter() - t_start)
            if smoke:  # the smoke's numbers mean nothing: every run at once, so it ends in well under a minute
                pending.append((r, start_pair(name, method, model, data, work, settings, device, threads)))
                continue
            if left < 30:
                r["error"] = "skipped: the script's time budget is spent"
            else:
                r.update(finish_pair(start_pair(name, method, model, data, work, settings, device, threads), left))
            _say(r)
    for r, h in pending:
        r.update(finish_pair(h, 300.0))
        _say(r)
    wall = time.perf_counter() - t_start
    lines = report(rows, smoke, wall)
    if smoke:
        print("\n".join(lines))
        failed = [r for r in rows if "error" in r]
        print(f"HEADLINE gpu.py --cpu-smoke: {len(rows) - len(failed)}/{len(rows)} runs completed in {wall:.0f} s")
        raise SystemExit(1 if failed else 0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gpu.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(lines))
    big = [r for r in rows if r["name"] == "llama-3-8b" and "error" not in r]
    if big:
        peak = max(m["max_allocated"] for m in big[0]["memory"])
        print(f"HEADLINE Llama-3-8B DECA peer, gossiping: peak {peak / 1e9:.1f} GB allocated (target < 24 GB)")


if __name__ == "__main__":
    main()
