"""What one checkpoint costs a peer: a full save against a later save into the same root (checkpoint._Reuse).

A peer writes a checkpoint after every activation (144 times per peer in `make cluster`), always the same model into
the same root. This saves the embedded model with its tokenizer and a peer's `deca_state.json`, as `peer._checkpoint`
does, N times each way in alternation, each way into its own root (the previous checkpoint is deleted after each
save, as always): *full* with the reuse plan forgotten before every save (what the first save of a run costs: every
save before the reuse existed, plus planning it, which reads the weight file's header), *later* as a peer now saves
(weights written, the other files linked). Wall and CPU time (process_time) per save, medians.

    .venv/bin/python benchmarks/checkpoint_cost.py [--n 40]

Writes benchmarks/results/checkpoint_cost.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deca_p2p import checkpoint
    from deca_p2p.checkpoint import save_atomic
    from deca_p2p.models import BASE_MODEL_DIR, QuietProgress

    torch.set_num_threads(1)
    with QuietProgress():
        model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    state = json.dumps({"activation": 0, "round": 0, "block": 0, "batcher_generator": list(range(5056))})
    # on the disk peers write to (runs/), not tmpfs
    work = Path(tempfile.mkdtemp(prefix=".ckpt-bench-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else ROOT))
    times: dict[str, list[tuple[float, float]]] = {"full": [], "later": []}
    try:
        for kind in times:
            save_atomic(model, tok, work / kind, "warm", extra_files={"deca_state.json": state})
        for i in range(a.n):
            for kind in times:
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)  # the weights changed since the last save
                if kind == "full":
                    checkpoint._REUSE.pop(str(work / "full"), None)  # this root only
                w0, c0 = time.perf_counter(), time.process_time()
                save_atomic(model, tok, work / kind, f"a{i:05d}", extra_files={"deca_state.json": state})
                times[kind].append((time.perf_counter() - w0, time.process_time() - c0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v) * 1e3, statistics.median(c for _, c in v) * 1e3)
           for k, v in times.items()}
    full, later = med["full"], med["later"]
    n_params = sum(p.numel() for p in model.parameters())
    lines = ["# What one checkpoint costs a peer", "",
             f"Command: `.venv/bin/python benchmarks/checkpoint_cost.py{'' if a.n == 40 else f' --n {a.n}'}`  ",
             f"Machine: {machine_facts()}  ", f"Run: {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"The embedded model ({n_params:,} parameters, float32) with its tokenizer and a `deca_state.json`, saved "
             f"with `checkpoint.save_atomic` {a.n} times each way, alternating; medians per save.", "",
             "| save | wall ms | CPU ms |", "|---|---:|---:|",
             "| full (`save_pretrained`, tokenizer, every file fsynced; then the reuse is planned) | "
             f"{full[0]:.1f} | {full[1]:.1f} |",
             f"| later (same root: weights written, unchanged files linked) | {later[0]:.1f} | {later[1]:.1f} |",
             "", f"Later / full: wall x{later[0] / full[0]:.2f}, CPU x{later[1] / full[1]:.2f}.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
