"""Peak memory of one DECA peer versus one decentralized-Adam peer (whole model active), on CPU.

Each variant runs in a fresh subprocess (so peaks never mix): it builds a LLaMA-architecture model from a
config (random init, float32), records the model-only baseline RSS, then trains through the project's own
code path -- deca_p2p.trainer.PeerTrainer with a deca_p2p.config.TrainConfig (algo "deca": one decoder
layer per block plus the embeddings and head blocks, the TrainConfig defaults; algo "dadam": one block holding
every parameter) -- for the same number of inner steps, each followed by a mix through the optimizer's mix():

* self-mix: the peer alone, mixed = MixAccumulator over its own block (weight 1), as gossip does with no
  neighbour present;
* ring peer: what gossip.Gossip.exchange holds on a degree-2 peer (ring) with the raw codec (protocol v3): its
  θ½ sent whole and zero-copy, two neighbours' blocks as received buffers (wire.decode of copies of the frames,
  standing in for the network), the float32 MixAccumulator over the three, the mix handed to the parameters.

Peak RSS = the kernel's high-water mark (resource.getrusage ru_maxrss), cross-checked by a psutil sampler
thread every 10 ms, which also draws the timeline.

    .venv/bin/python benchmarks/memory.py [--quick]

Writes benchmarks/results/memory.md and .png; prints the headline ratio last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from common import RESULTS, machine_facts, spawn

MiB = 1 << 20

# inner_steps: per DECA block; decentralized Adam gets inner_steps x (number of DECA blocks), the same count.
# ring_dadam_steps: decentralized Adam's ring-peer run is cut to a full message plus two deltas (its memory is
# steady from the second step on; the whole-model wire path costs ~15 s a step on this box).
FULL = dict(hidden=768, intermediate=2048, layers=8, heads=12, vocab=8000, seq=64, batch=2, inner_steps=1,
            ring_dadam_steps=3)
QUICK = dict(hidden=256, intermediate=688, layers=4, heads=4, vocab=4000, seq=64, batch=2, inner_steps=1,
             ring_dadam_steps=3)
VARIANTS = [("deca", "self"), ("dadam", "self"), ("deca", "ring"), ("dadam", "ring")]
ALGO_LABEL = {"deca": "DECA (1 layer / block)", "dadam": "decentralized Adam (whole model)"}
MODE_LABEL = {"self": "self-mix", "ring": "ring peer (degree 2)"}


# ----------------------------------------------------------------------------------------- child


class SyntheticBatcher:
    """Batcher-compatible: PeerTrainer only calls next_batch(). Uniform random tokens, full attention mask."""

    def __init__(self, vocab: int, batch: int, seq: int, seed: int = 0):
        import torch

        self.vocab, self.batch, self.seq = vocab, batch, seq
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        import torch

        ids = torch.randint(self.vocab, (self.batch, self.seq), generator=self.generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Sampler:
    """RSS every `interval` s in a daemon thread: (t, rss) samples and the max since the last mark()."""

    def __init__(self, interval: float = 0.01):
        import threading

        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self.max = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = self.proc.memory_info().rss
        self.samples.append((time.monotonic() - self.t0, rss))
        self.max = max(self.max, rss)
        return rss

    def mark(self) -> int:
        """Reset the running max; returns the max since the previous mark."""
        m, self.max = self.max, 0
        return max(m, self.sample())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(a) -> None:
    sampler = Sampler()
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from deca_p2p import wire
    from deca_p2p.config import TrainConfig
    from deca_p2p.optim import MixAccumulator, self_weight
    from deca_p2p.trainer import PeerTrainer

    p = json.loads(a.params)
    torch.set_num_threads(p["threads"])
    out: dict = {"algo": a.algo, "mode": a.mode, "events": []}

    def event(name: str) -> None:
        out["events"].append((name, time.monotonic() - sampler.t0))

    rss_imports = sampler.sample()
    event("imports")
    config = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                         max_position_embeddings=max(256, p["seq"]), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    gc.collect()
    time.sleep(0.05)
    out["rss_imports"] = rss_imports
    out["rss_model"] = sampler.sample()  # the model-only baseline
    out["maxrss_model"] = maxrss_bytes()
    out["n_params"] = sum(x.numel() for x in model.parameters())
    event("model loaded")
    sampler.mark()

    # the same number of inner steps for both: DECA visits every block, dadam's one block gets all of them
    dadam_steps = p["ring_dadam_steps"] if a.mode == "ring" else p["total_steps"]
    cfg = TrainConfig(algo=a.algo, rounds=1, inner_steps=p["inner_steps"] if a.algo == "deca" else dadam_steps,
                      lr=1e-4, batch_size=p["batch"], max_len=p["seq"], threads=p["threads"],
                      embeddings_block=True, head_block=True).validate()  # every parameter trains: the whole partition
    trainer = PeerTrainer(model, SyntheticBatcher(p["vocab"], p["batch"], p["seq"]), cfg)
    named = dict(model.named_parameters())
    out["blocks"] = [(b.name, sum(named[n].numel() for n in b.param_names)) for b in trainer.blocks]
    acts = trainer.schedule.activations()
    steps_per_act = cfg.inner_steps
    # ring peer: neighbour ids 1, 2; Metropolis weights on a ring are 1/3 each
    row = {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    out["per_activation"] = []
    out["step_s"] = []
    loss = None
    for rnd, blk in acts:
        trainer.activate(blk)
        for step in range(steps_per_act):
            t0 = time.perf_counter()
            stats = trainer.local_step()
            loss = stats["loss"]
            tensors = trainer.block()
            own = list(tensors.values())
            if a.mode == "self":
                acc = MixAccumulator(own)
                acc.add(own, 1.0)
            else:  # protocol v3, raw: θ½ goes out zero-copy, whole; each neighbour's block is its own received buffer
                frames = wire.encode(wire.Message("block", src=0, round=rnd, block=blk, step=step, codec="raw",
                                                  full=True, tensors=tensors), check_finite=False)
                theirs = {j: wire.decode([bytearray(f) for f in frames]).tensors for j in (1, 2)}  # 2 received buffers
                del frames
                acc = MixAccumulator(own)
                for j in sorted(theirs):
                    acc.add([theirs[j][k] for k in tensors], row[j])
                acc.add(own, self_weight(row, 0, theirs))
                del theirs
            mixed = acc.result()
            del acc, own, tensors
            trainer.apply_mix(mixed)
            del mixed
            out["step_s"].append(time.perf_counter() - t0)
        out["per_activation"].append((trainer.blocks[blk].name, sampler.mark()))
        event(f"block {trainer.blocks[blk].name} done")
    out["final_loss"] = loss
    out["steps"] = len(out["step_s"])
    out["maxrss_end"] = maxrss_bytes()
    out["rss_end"] = sampler.sample()
    out["sampled_peak_train"] = max(r for _, r in out["per_activation"])
    sampler.stop()
    out["timeline"] = sampler.samples[:: max(1, len(sampler.samples) // 2000)]
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent


def start_variant(algo: str, mode: str, params: dict) -> subprocess.Popen:
    return spawn(__file__, ["--child", "--algo", algo, "--mode", mode, "--params", json.dumps(params)])


def finish_variant(proc: subprocess.Popen, algo: str, mode: str) -> dict:
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        raise SystemExit(f"variant {algo}/{mode} failed with exit code {proc.returncode}")
    r = json.loads(out.strip().splitlines()[-1])
    print(f"[{algo}/{mode}] {r['steps']} steps, baseline {r['rss_model'] / MiB:.0f} MiB, "
          f"peak {r['maxrss_end'] / MiB:.0f} MiB", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model, self-mix only (smoke test, < 30 s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: all cores)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="deca", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="self", help=argparse.SUPPRESS)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    t_start = time.monotonic()
    params = dict(QUICK if a.quick else FULL)
    # --quick runs its two variants side by side (separate processes: peaks still do not mix), 1 thread each
    params["threads"] = a.threads or (1 if a.quick else os.cpu_count() or 1)
    n_deca_blocks = params["layers"] + 2  # embeddings + layers + head (TrainConfig defaults)
    params["total_steps"] = params["inner_steps"] * n_deca_blocks
    variants = VARIANTS[:2] if a.quick else VARIANTS
    res = {}
    if a.quick:
        procs = {v: start_variant(*v, params) for v in variants}
        for v, proc in procs.items():
            res[v] = finish_variant(proc, *v)
    else:
        for v in variants:
            print(f"[{v[0]}/{v[1]}] ...", flush=True)
            res[v] = finish_variant(start_variant(*v, params), *v)
    write_report(a, params, res, variants, time.monotonic() - t_start)


# ----------------------------------------------------------------------------------------- report


def analytic(params: dict, r_deca: dict, r_dadam: dict) -> list[str]:
    P = r_deca["n_params"]
    b = max(n for _, n in r_deca["blocks"])
    D = len(r_deca["blocks"])
    gb = lambda x: x / 1e9  # noqa: E731
    return [
        "### What the numbers should be (bytes per parameter, from the code)", "",
        f"P = {P / 1e6:.1f} M parameters; DECA has D = {D} blocks, the largest b = {b / 1e6:.2f} M "
        f"({', '.join(f'{n} {k / 1e6:.2f} M' for n, k in r_deca['blocks'][:2])}, ..., "
        f"{r_deca['blocks'][-1][0]} {r_deca['blocks'][-1][1] / 1e6:.2f} M).", "",
        "Per *active* parameter the current code holds, on top of the fp32 model (4 B): the gradient (4), Adam m "
        "and v (8), DECA's θ_r clone kept between local_step and mix (4), the float32 MixAccumulator, which becomes "
        "the parameters (4) = **20 B**; a ring peer with the raw codec (protocol v3: θ½ sent whole, zero-copy) adds "
        "the neighbours' received blocks until the mix (4 x degree) and the old parameter storage while it is on the "
        "wire (4) = **+12 B at degree 2** (version 2's public copies and float64 mix: 28 B and +20 B).", "",
        "| | model | active-block state, self-mix | ring peer (degree 2) |", "|---|---:|---:|---:|",
        f"| DECA | 4P = {gb(4 * P):.2f} GB | 20b = {gb(20 * b):.2f} GB | 32b = {gb(32 * b):.2f} GB |",
        f"| decentralized Adam | 4P = {gb(4 * P):.2f} GB | 20P = {gb(20 * P):.2f} GB | 32P = {gb(32 * P):.2f} GB |",
        "", "plus activations (batch x seq dependent, larger for the whole-model backward) and the interpreter, "
        "torch and transformers (the part of the baseline that is not the model).", "",
        "**BAdam's published figure** (DESIGN §2, Ledzy/BAdam README), mixed precision on a GPU: about "
        "2M + 16M/D GB for block-wise Adam versus 18M GB for Adam (M = billions of parameters; bf16 weights 2 B, "
        "plus fp32 master + gradient + m + v = 16 B per active parameter). Applied to this model "
        f"(M = {P / 1e9:.3f}, D = {D}): {2 * P / 1e9 + 16 * P / 1e9 / D:.3f} GB vs {18 * P / 1e9:.3f} GB, ratio "
        f"{(2 + 16 / D) / 18:.2f}; for Llama 3-8B with D = 32: {2 * 8 + 16 * 8 / 32:.0f} GB vs {18 * 8} GB, ratio "
        f"{(2 + 16 / 32) / 18:.2f} (BAdam reports 23.5 GB on one RTX 3090, activations included). Our CPU setting "
        "keeps the whole model in fp32 (4 B) and holds 28 B per active parameter, so the same arithmetic gives "
        f"(4 + 28/D) / 32 = {(4 + 28 * b / P) / 32:.2f} here (with the real largest block) before activations and "
        "the runtime's fixed RSS.", ""]


def write_report(a, params, res, variants, wall) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cmd = ".venv/bin/python benchmarks/memory.py" + (" --quick" if a.quick else "") + \
        (f" --threads {a.threads}" if a.threads else "")
    mb = lambda x: x / MiB  # noqa: E731
    r0 = res[("deca", "self")]
    L = ["# Peak memory: one DECA peer vs one decentralized-Adam peer (CPU)", "",
         f"Command: `{cmd}`  ", f"Machine: {machine_facts()}; no GPU used  ",
         f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall; {params['threads']} torch thread(s) per variant; "
         f"1-min load average {os.getloadavg()[0]:.1f} at the end (other jobs share the machine: times are not "
         "benchmarks here, memory is).", "",
         f"Model: LLaMA architecture from a config, random init, float32: hidden {params['hidden']}, intermediate "
         f"{params['intermediate']}, {params['layers']} layers, {params['heads']} heads, vocab {params['vocab']}, "
         f"untied head: **{r0['n_params'] / 1e6:.1f} M parameters** ({4 * r0['n_params'] / 1e9:.2f} GB). "
         f"Batch {params['batch']} x {params['seq']} tokens of synthetic data.", "",
         f"Training: `PeerTrainer` + `TrainConfig(algo=...)`, lr 1e-4. DECA: the whole partition (embeddings, one "
         f"block per decoder layer, head: {len(r0['blocks'])} blocks), 1 round x {params['inner_steps']} inner "
         f"step(s) per block; decentralized Adam (`algo=\"dadam\"`: one block of all parameters): "
         f"{params['total_steps']} inner steps, the same count (ring peer: {params['ring_dadam_steps']} steps, one whole "
         "message each). Every step is followed by "
         "a mix through `opt.mix()` (see the modes below). Each variant runs in a fresh subprocess" +
         (" (the two side by side)." if a.quick else ", one after the other."), "",
         "- **self-mix**: `MixAccumulator` over the peer's own block with weight 1 (gossip with no neighbour present).",
         "- **ring peer (degree 2)**: as `gossip.Gossip.exchange` on a ring with the raw codec (protocol v3): θ½ "
         "encoded whole and zero-copy, two neighbours' blocks as received buffers (`wire.decode` of writable copies of the "
         "frames), the float32 `MixAccumulator` over the three (weights 1/3), handed to the parameters.", "",
         "Peak = kernel high-water RSS (`getrusage` ru_maxrss) at the end of training; baseline = RSS after building "
         "the model, before training (model-only). The 10 ms psutil sampler agrees to within its sampling gap.", "",
         "| algorithm | mix | steps | baseline RSS MiB | peak RSS MiB | peak - baseline MiB | sampled peak MiB | "
         "end RSS MiB | median step s | final loss |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for algo, mode in variants:
        r = res[(algo, mode)]
        steps = sorted(r["step_s"])
        L.append(f"| {ALGO_LABEL[algo]} | {MODE_LABEL[mode]} | {r['steps']} | {mb(r['rss_model']):.0f} | "
                 f"{mb(r['maxrss_end']):.0f} | {mb(r['maxrss_end'] - r['rss_model']):.0f} | "
                 f"{mb(r['sampled_peak_train']):.0f} | {mb(r['rss_end']):.0f} | {steps[len(steps) // 2]:.2f} | "
                 f"{r['final_loss']:.3f} |")
    L += ["", f"Runtime without the model (RSS after importing torch + transformers + deca_p2p): "
          f"{mb(r0['rss_imports']):.0f} MiB; the model adds {mb(r0['rss_model'] - r0['rss_imports']):.0f} MiB "
          f"(4P = {mb(4 * r0['n_params']):.0f} MiB).", ""]
    ratios = {}
    L += ["## Ratios (target: DECA peak <= 0.4 x decentralized-Adam peak)", "",
          "| mix | DECA / dAdam, total peak RSS | DECA / dAdam, peak above the model-only baseline |", "|---|---:|---:|"]
    for mode in ("self", "ring"):
        if ("deca", mode) in res and ("dadam", mode) in res:
            d, m = res[("deca", mode)], res[("dadam", mode)]
            tot = d["maxrss_end"] / m["maxrss_end"]
            above = (d["maxrss_end"] - d["rss_model"]) / (m["maxrss_end"] - m["rss_model"])
            ratios[mode] = (tot, above)
            L.append(f"| {MODE_LABEL[mode]} | **{tot:.2f}** {'(meets 0.4)' if tot <= 0.4 else '(misses 0.4)'} | "
                     f"{above:.2f} |")
    L += ["", "Peak RSS per DECA activation (self-mix), MiB: " + ", ".join(
        f"{n} {mb(v):.0f}" for n, v in res[("deca", "self")]["per_activation"]), ""]
    L += analytic(params, res[("deca", "self")], res[("dadam", "self")])
    L += ["## GPU", "",
          "The GPU half of this benchmark (an 8B model on one GPU, torch.cuda.max_memory_allocated for DECA vs "
          "decentralized Adam) was **not run**: no GPU was lent to this session. Expect BAdam's arithmetic above "
          "(~20 GB + activations for block-wise Adam with bf16 weights vs ~144 GB for Adam on Llama 3-8B) plus "
          "this code's extra buffers per *active* parameter (θ_r clone, float32 mix accumulator, received blocks: "
          "8-20 B), i.e. about 1.7-4.4 GB more for one 218 M-parameter Llama 3-8B decoder layer; "
          "for decentralized Adam the same buffers scale with all 8 B parameters.", ""]
    (RESULTS / "memory.md").write_text("\n".join(L))
    plot(res, variants, params)
    print("\n".join(L))
    tot, above = ratios["self"]
    extra = f"; ring peer {ratios['ring'][0]:.2f}x total / {ratios['ring'][1]:.2f}x above baseline" if "ring" in ratios else ""
    print(f"HEADLINE DECA / decentralized-Adam peak RSS (self-mix, {r0['n_params'] / 1e6:.0f} M params) "
          f"[target <= 0.4]: {tot:.2f}x total, {above:.2f}x above the model-only baseline{extra}")


def plot(res, variants, params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    colors = {"deca": "tab:red", "dadam": "tab:blue"}
    for algo, mode in variants:
        r = res[(algo, mode)]
        t0 = dict(r["events"]).get("model loaded", 0.0)
        t1 = r["events"][-1][1]
        span = max(t1 - t0, 1e-9)
        t_imp = dict(r["events"]).get("imports", 0.0)  # from the end of the imports: model build, then training
        ts = [((t - t0) / span, rss / MiB) for t, rss in r["timeline"] if t >= t_imp]
        ax.plot([t for t, _ in ts], [x for _, x in ts], "-" if mode == "self" else "--", color=colors[algo],
                label=f"{ALGO_LABEL[algo]}, {MODE_LABEL[mode]} ({r['steps']} steps, {span:.0f} s)")
    ax.axhline(res[variants[0]]["rss_model"] / MiB, color="gray", ls=":", label="model-only baseline")
    ax.set_xlabel("fraction of the training phase (< 0: building the model; 0 = model built; 1 = last step done)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("RSS while training (10 ms samples)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = [f"{'DECA' if a == 'deca' else 'dAdam'}\n{m}" for a, m in variants]
    base = [res[v]["rss_model"] / MiB for v in variants]
    peak = [res[v]["maxrss_end"] / MiB for v in variants]
    bx.bar(names, base, color="lightgray", label="model-only baseline")
    bx.bar(names, [p - b for p, b in zip(peak, base)], bottom=base, color=[colors[a] for a, _ in variants],
           label="training, above baseline")
    for i, p in enumerate(peak):
        bx.text(i, p, f"{p:.0f}", ha="center", va="bottom", fontsize=8)
    bx.set_ylabel("peak RSS (MiB)")
    bx.set_title("peak RSS (ru_maxrss)")
    bx.legend(fontsize=8)
    fig.suptitle(f"One peer, {res[variants[0]]['n_params'] / 1e6:.0f} M-parameter LLaMA, CPU fp32")
    fig.tight_layout()
    fig.savefig(RESULTS / "memory.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
