"""Validate `deca-peer plan` (deca_p2p/plan.py) against what was measured on this machine, and print what it predicts
at internet scale.

Reads the committed measurements -- nothing heavy is rerun:

* benchmarks/results/bandwidth_latency.md: message size S, per-message transfer time at the configured bandwidth
  (S / goodput) and inner-step wall time of real peers on ring8 (8 peers on 2 cores) and on a ring of 2 (one core
  each), under emulated latency and bandwidth;
* benchmarks/results/memory.md: peak RSS of one DECA and one decentralized-Adam peer (a 68.9 M-parameter Llama,
  float32, CPU), self-mix and ring peer;
* benchmarks/results/checkpoint_cost.md: one checkpoint's wall time, against the plan's checkpoint term with this
  disk's rate calibrated now (a few seconds of saves in runs/: the one thing this script measures).

For each it writes the plan's prediction, the measurement, their ratio and whether it is within 15%
(benchmarks/results/plan_validation.md), then the plan's predictions for two internet-scale settings (the README's
table). The step-time rows take the compute time from the measurement (the runs did not record their tokens per
step, so the plan's FLOP model cannot be checked against them; ring8's is the local step's CPU time, with 8 peers on
2 cores); what is predicted there is communication, the exchange's local overhead and, where peers share cores, the
sharing.

    .venv/bin/python benchmarks/plan_validation.py
"""
from __future__ import annotations

import json
import re
import sys

from common import RESULTS, ROOT

sys.path.insert(0, str(ROOT))
from deca_p2p import plan  # noqa: E402
from deca_p2p.topology import generate  # noqa: E402

MiB = 1 << 20
TOL = 0.15
BOUNDS: list[tuple] = []    # ring8: (L, R, compute CPU, pipeline, all at once, predicted, measured)
UNSHARED: list[tuple] = []  # ring8's steps as if each peer had a core (the plan before it modelled sharing)


def table_rows(text: str, first_cell: str) -> list[list[list[str]]]:
    """Every Markdown table whose header starts with `first_cell`, as lists of rows of cells (header excluded)."""
    tables, cur = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = [] if cells[0] == first_cell else None
                if cur is not None:
                    tables.append(cur)
                continue
            if set(line.replace("|", "").strip()) <= set("-: "):
                continue
            cur.append(cells)
        else:
            cur = None
    return tables


def within(pred: float, meas: float) -> bool:
    return abs(pred / meas - 1) <= TOL


def n_within(rows) -> int:
    """How many (name, predicted, measured) rows are within TOL."""
    return sum(within(p, m) for _, p, m in rows)


def verdict(pred: float, meas: float) -> tuple[str, str]:
    return f"{pred / meas:.2f}", "yes" if within(pred, meas) else "**no**"


def bandwidth_latency(lines: list[str]) -> list[tuple]:
    text = (RESULTS / "bandwidth_latency.md").read_text()
    ring8, control = table_rows(text, "latency ms")[:2]
    cores = int(re.search(r"\((\d+) cores", text).group(1))
    arch = plan.load_arch(str(ROOT / "deca_p2p" / "base_model"))
    layer = plan.make_blocks(arch, "deca")[0]
    s_pred = plan.message_bytes(layer, "raw")
    cpu = plan.DEVICES["cpu"]
    fixed, per_source = plan.OVERHEAD_BYTES["raw"]
    out = []
    lines += ["## Communication: `bandwidth_latency.md` (embedded model, one decoder layer per message, raw codec)", "",
              "Predicted step = `plan.step_seconds`: with a core per peer (the ring of 2) measured compute + max over "
              f"links (L + S/R) + the exchange's local overhead ({fixed} + {per_source} x (degree + 1) bytes per block "
              f"parameter at the `cpu` class's {cpu.host_bw / 1e9:g} GB/s); with F peers per core (ring8: 8 peers on "
              f"{cores} cores, F = {8 / cores:g}) the mean of two schedules of a step costing each peer compute + local "
              "overhead + transport of CPU (transport: the kernel's copies of the messages sent and received, "
              f"{2 * plan.TRANSPORT_BYTES} x degree x S bytes at the same rate): every peer at once, F x that CPU then "
              "L + S/R, and the ideal pipeline replayed by `plan_shared.py` (the table after this one). Compute is "
              "measured: a core each, the table's `compute + L + S/R` minus L + S/R; ring8, the local step's own CPU "
              "time (`compute CPU ms`), what it costs a core however shared. Transfer = S/R predicted against "
              "S / goodput measured.", "",
              "| run | latency ms | Mbit/s | quantity | predicted | measured | ratio | within 15% |",
              "|---|---:|---:|---|---:|---:|---:|---|"]
    s_meas = float(ring8[0][2]) * 1e6
    r, ok = verdict(s_pred, s_meas)
    lines.append(f"| all | | | message size S (MB) | {s_pred / 1e6:.4f} | {s_meas / 1e6:.3f} | {r} | {ok} |")
    out.append(("message size S", s_pred, s_meas))
    for name, rows, n_peers, degree in (("ring8 (8 peers, 2 cores)", ring8, 8, 2), ("ring of 2 (a core each)", control, 2, 1)):
        share = max(1.0, n_peers / cores)
        for row in rows:
            lat, bw = float(row[0]), None if row[1] == "unlimited" else float(row[1])
            step_wall, expected = float(row[7]), float(row[8])
            goodput = float(row[4]) * bw if bw else None  # from the ratio column: 3 decimals, not a rounded Mbit/s
            s = float(row[2]) * 1e6
            compute = expected - lat / 1e3 - (s * 8 / (bw * 1e6) if bw else 0.0)
            if share > 1:
                compute = float(row[11]) / 1e3  # the step's CPU time on the shared cores
            topo = generate("ring", n_peers, link={"latency_ms": lat, "bandwidth_mbps": bw})
            lat_s, tx = plan._link_seconds(topo.link(0, 1), s_pred)
            local, transport = plan.exchange_cpu_seconds(layer.params, s_pred, degree, "raw", cpu.host_bw)
            nbrs = {i: topo.neighbors(i) for i in topo.nodes}
            step_pred = plan.step_seconds(compute, lat_s + tx, local, transport, 1.0, share, nbrs)[0]
            if share > 1:
                wall = expected - lat / 1e3 - (s * 8 / (bw * 1e6) if bw else 0.0)  # measured compute wall, shared
                UNSHARED.append((name, plan.step_seconds(wall, lat_s + tx, local, transport)[0], step_wall))
                lo, hi = plan.shared_bounds(compute, lat_s + tx, local, transport, 1.0, share, nbrs)["seq"]
                BOUNDS.append((lat, bw, compute, lo, hi, step_pred, step_wall))
            if bw:
                t_meas = s * 8 / (goodput * 1e6)
                r, ok = verdict(tx, t_meas)
                lines.append(f"| {name} | {lat:g} | {bw:g} | transfer S/R (ms) | {tx * 1e3:.2f} | {t_meas * 1e3:.2f} | "
                             f"{r} | {ok} |")
                out.append((f"{name} {lat:g} ms {bw:g} Mbit/s transfer", tx, t_meas))
            r, ok = verdict(step_pred, step_wall)
            lines.append(f"| {name} | {lat:g} | {f'{bw:g}' if bw else 'unlimited'} | step wall (s) | {step_pred:.3f} | {step_wall:.3f} | "
                         f"{r} | {ok} |")
            out.append((f"{name} {lat:g} ms {bw} step", step_pred, step_wall))
    return out


def shared_table() -> list[str]:
    """Ring8's two bracketing schedules and their mean against the measured step."""
    out = ["", "Ring8's step (8 peers on 2 cores), the two schedules the prediction is the mean of (s; ratio to measured "
           "in brackets):", "",
           "| latency ms | Mbit/s | compute CPU ms | pipeline (optimistic) | all at once (pessimistic) | mean = predicted "
           "| measured |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for lat, bw, c, lo, hi, pred, meas in BOUNDS:
        out.append(f"| {lat:g} | {f'{bw:g}' if bw else 'unlimited'} | {1e3 * c:.1f} | {lo:.3f} ({lo / meas:.2f}) | "
                   f"{hi:.3f} ({hi / meas:.2f}) | {pred:.3f} ({pred / meas:.2f}) | {meas:.3f} |")
    return out + ["", *earlier_runs(), ""]


def earlier_runs() -> list[str]:
    """The same schedules against the two runs before the peers' time slice (held out: the mean was chosen on the run
    above), from bandwidth_latency_earlier_runs.json."""
    f = RESULTS / "bandwidth_latency_earlier_runs.json"
    if not f.exists():
        return []
    arch = plan.load_arch(str(ROOT / "deca_p2p" / "base_model"))
    layer = plan.make_blocks(arch, "deca")[0]
    s, cpu = plan.message_bytes(layer, "raw"), plan.DEVICES["cpu"]
    local, transport = plan.exchange_cpu_seconds(layer.params, s, 2, "raw", cpu.host_bw)  # ring8: degree 2
    ratios: dict[str, list[float]] = {"pipeline": [], "all at once": [], "mean": []}
    rows = json.loads(f.read_text())["rows"]
    for r in rows:
        topo = generate("ring", 8, link={"latency_ms": r["latency_ms"], "bandwidth_mbps": r["bandwidth_mbps"]})
        lat, tx = plan._link_seconds(topo.link(0, 1), s)
        lo, hi = plan.shared_bounds(r["compute_cpu_s"], lat + tx, local, transport, 1.0, 4.0,
                                    {i: topo.neighbors(i) for i in topo.nodes})["seq"]
        for k, v in (("pipeline", lo), ("all at once", hi), ("mean", (lo + hi) / 2)):
            ratios[k].append(v / r["step_wall_s"])
    span = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in ratios.items()}
    n_ok = sum(within(x, 1.0) for x in ratios["mean"])
    commits = sorted({r["table_commit"] for r in rows})
    return [f"How the mean was chosen, and a check on runs it was not chosen on: the all-at-once schedule was the "
            "model first. The run committed at 7e98146, the first with the peers' long time slice, had shorter steps "
            "than before: that schedule overestimated them by up to 1.22x, and the mean of the two (0.95-1.03 there) "
            "was chosen on that run. The "
            f"{len(commits)} runs before the time slice (the tables committed at {' and '.join(commits)}; their local "
            "steps' CPU time, from their run directories, in `bandwidth_latency_earlier_runs.json`) give, predicted / "
            f"measured over their {len(rows)} ring8 steps: pipeline {span['pipeline']}, all at once "
            f"{span['all at once']}, mean {span['mean']} ({n_ok} of {len(rows)} within 15%). Which schedule a host "
            "is nearer depends on how its scheduler orders the peers, which the plan does not model."]


def memory_rows(lines: list[str]) -> list[tuple]:
    text = (RESULTS / "memory.md").read_text()
    (rows,) = table_rows(text, "algorithm")[:1]
    m = re.search(r"hidden (\d+), intermediate (\d+), (\d+) layers, (\d+) heads, vocab (\d+)", text)
    h, i, n_layers, heads, vocab = map(int, m.groups())
    m = re.search(r"Batch (\d+) x (\d+) tokens", text)
    tokens = int(m.group(1)) * int(m.group(2))
    arch = plan.arch_from_config(dict(model_type="llama", hidden_size=h, intermediate_size=i, num_hidden_layers=n_layers,
                                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                      tie_word_embeddings=False), "memory.md's Llama")
    runtime = plan.DEVICES["cpu"].runtime_bytes
    m = re.search(r"Runtime without the model[^:]*: (\d+) MiB", text)
    runtime_measured = f"{m.group(1)} MiB" if m else "not stated"
    lines += ["", "## Memory: `memory.md` (68.9 M-parameter Llama, float32, CPU; one peer)", "",
              f"The benchmark's partition (embeddings, {n_layers} layers, head: {n_layers + 2} blocks), batch "
              f"{tokens} tokens, its harness drops each mix result after applying it (`holds_previous_mix=False`). "
              "`above baseline` = peak RSS minus the RSS with the model loaded (what training adds); `total` adds the "
              f"model (4 B/parameter) and the plan's fixed CPU runtime ({runtime / MiB:.0f} MiB; measured there: "
              f"{runtime_measured}).", "",
              "| algorithm | mix | quantity | predicted MiB | measured MiB | ratio | within 15% | predicted peak at |",
              "|---|---|---|---:|---:|---:|---|---|"]
    out = []
    for row in rows:
        method = "deca" if row[0].startswith("DECA") else "dadam"
        degree = 0 if row[1] == "self-mix" else 2
        base, peak = float(row[3]), float(row[4])
        blocks = plan.make_blocks(arch, method, embeddings_block=True, head_block=True)
        mem = plan.memory(arch, method, blocks, degree, tokens, "float32", False, runtime, holds_previous_mix=False)
        above = mem.device_bytes - mem.parts["weights"] - runtime
        for q, pred, meas in (("above baseline", above / MiB, peak - base), ("total peak", mem.device_bytes / MiB, peak)):
            r, ok = verdict(pred, meas)
            lines.append(f"| {row[0]} | {row[1]} | {q} | {pred:.0f} | {meas:.0f} | {r} | {ok} | "
                         f"{mem.parts['block']}, {mem.parts['peak_phase']} |")
            out.append((f"{method} {row[1]} {q}", pred, meas))
    per_act = re.search(r"Peak RSS per DECA activation \(self-mix\), MiB: (.*)", text)
    if per_act:
        base = float(rows[0][3])
        measured = {k: float(v) for k, v in (x.strip().rsplit(" ", 1) for x in per_act.group(1).split(","))}
        lines += ["", "Per DECA activation (self-mix), peak above baseline, MiB (the measured value is the running "
                  "high-water mark of RSS since the previous activation; a peer hands the freed heap back to the OS "
                  "when it switches blocks, so it falls back in between):", "", "| block | predicted | measured | ratio |", "|---|---:|---:|---:|"]
        blocks = plan.make_blocks(arch, "deca", embeddings_block=True, head_block=True)
        for b in blocks:
            mem = plan.memory(arch, "deca", [b], 0, tokens, "float32", False, runtime, holds_previous_mix=False)
            pred = (mem.device_bytes - mem.parts["weights"] - runtime) / MiB
            meas = measured[b.name] - base
            lines.append(f"| {b.name} | {pred:.0f} | {meas:.0f} | {pred / meas:.2f} |")
    return out


SCENARIOS = [
    ("Llama-3-8B, 16 peers (ring16, degree 2), 1 Gbit/s, 50 ms", "llama-3-8b", ("ring", 16), 50, 1000, "gpu", False),
    ("Llama-3-8B, 16 peers (exp16, degree 7), 1 Gbit/s, 50 ms", "llama-3-8b", ("exp", 16), 50, 1000, "gpu", False),
    ("Qwen2.5-0.5B, 8 peers (ring8), home links 100 Mbit/s up (shared by both neighbours), 20 ms", "qwen2.5-0.5b",
     ("ring", 8), 20, 100, "consumer-gpu", True),
]


def checkpoint_rows(lines: list[str]) -> list[tuple]:
    """The checkpoint term (plan_checkpoint.py) against benchmarks/results/checkpoint_cost.md, with this disk's rate
    and fixed part measured now (`plan --calibrate`'s disk part, in runs/ as the benchmark wrote)."""
    from deca_p2p.models import BASE_MODEL_DIR
    from deca_p2p.plan_checkpoint import calibrate_disk, save_bytes, save_seconds

    (ROOT / "runs").mkdir(exist_ok=True)
    disk_bw, fixed = calibrate_disk(ROOT / "runs", reps=9)
    text = (RESULTS / "checkpoint_cost.md").read_text()
    run = re.search(r"Run: (.*)", text)
    lines += ["", "## Checkpoints", "",
              f"`checkpoint_cost.md` (run {run.group(1) if run else '?'}) against the plan's checkpoint term, with this "
              f"disk calibrated now (`plan --calibrate`'s disk part, in runs/ where the benchmark wrote): "
              f"{disk_bw / 1e9:.2f} GB/s + {fixed * 1e3:.2f} ms a save. *full* is a process's first save "
              "(predicted: the model written twice), *later, one file* the whole model written (as every decentralized "
              "Adam save), *later, block-sharded* one block's shard (as every later DECA save).", "",
              "| model | way | bytes written (plan) | predicted ms | measured ms | ratio | within 15% |",
              "|---|---|---:|---:|---:|---:|---|"]
    models = {"embedded": (plan.load_arch(str(BASE_MODEL_DIR / "config.json")), "float32"),
              "qwen": (plan.load_arch("qwen2.5-0.5b"), "bfloat16")}
    rows = []
    for cells in table_rows(text, "model")[0]:
        name, way, wall = cells[0], cells[2], float(cells[3])
        arch, dtype = models["embedded" if name.startswith("embedded") else "qwen"]
        later, first = save_bytes(arch, "deca", plan.make_blocks(arch, "deca"), dtype)
        (whole,), _ = save_bytes(arch, "dadam", plan.make_blocks(arch, "dadam"), dtype)  # every dadam save
        nbytes = {"full": first, "later, one file": whole, "later, block-sharded": sum(later) / len(later)}[way]
        pred = save_seconds(nbytes, disk_bw, fixed) * 1e3
        r, ok = verdict(pred, wall)
        lines.append(f"| {name} | {way} | {plan.fmt_bytes(nbytes)} | {pred:.1f} | {wall:.1f} | {r} | {ok} |")
        rows.append((f"{name.split(' (')[0]} {way}", pred, wall))
    return rows


def internet(lines: list[str]) -> None:
    lines += ["", "## Internet scale: model predictions (not measured)", "",
              "R = 8, T = 24 (every block 24 times), batch 8 x 512 tokens, gradient checkpointing, bf16 working dtype, "
              "default device classes "
              "(`gpu`: 400 TFLOP/s effective; `consumer-gpu`: 60 TFLOP/s), raw and bf16 codecs. Network = slowest "
              "peer. 'overlap' = compute and exchange pipelined (`--overlap`; the default runs them one after the other). "
              "Traffic = bytes sent by one peer over the run; methods at the same number of local steps.", "",
              "*checkpoint*: one save (after every activation), at the default disk's 1 GB/s + 5 ms a save.", "",
              "| setting | codec | method | bytes / exchange / link | compute s | comm s | step s | step s (overlap) | "
              "checkpoint s | run | run (overlap) | sent / peer | peak memory / peer |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for title, model, (kind, n), lat, bw, dev, shared in SCENARIOS:
        topo = generate(kind, n, link={"latency_ms": lat, "bandwidth_mbps": bw})
        for codec in ("raw", "bf16"):
            inp = plan.PlanInputs(codec=codec, inner_steps=8, rounds=24, batch_size=8, seq_len=512, dtype="bfloat16",
                                  shared_uplink=shared, gradient_checkpointing=True)
            p = plan.make_plan(plan.load_arch(model), topo, inp, plan.DEVICES[dev])
            for method, c in p["methods"].items():
                peer = max(c["peers"], key=lambda q: q["round_s"])
                nw = c["network"]
                mem = plan.fmt_bytes(nw["max_memory_device_bytes"])
                lines.append(f"| {title} | {codec} | {method} | {plan.fmt_bytes(peer['bytes_per_exchange_per_link'])} | "
                             f"{peer['compute_s']:.3g} | {peer['comm_s']:.3g} | {nw['step_s']:.3g} | "
                             f"{nw['step_overlap_s']:.3g} | {peer['checkpoint_s']:.3g} | {plan.fmt_s(nw['run_s'])} | "
                             f"{plan.fmt_s(nw['run_overlap_s'])} | "
                             f"{plan.fmt_bytes(peer['sent_bytes_run'])} | {mem} |")
    lines += ["", "Commands: `deca-peer plan --model llama-3-8b --topology T --codec bf16 --batch-size 8 "
              "--gradient-checkpointing` with T from `deca-peer topology gen ring 16 --latency-ms 50 --bandwidth-mbps "
              "1000` (or `exp 16`); `deca-peer plan --model qwen2.5-0.5b --topology T --device consumer-gpu "
              "--shared-uplink --codec bf16 --batch-size 8 --gradient-checkpointing` with T from `deca-peer topology "
              "gen ring 8 --latency-ms 20 --bandwidth-mbps 100`."]


def main() -> None:
    lines = ["# `deca-peer plan` against this machine's measurements", "",
             "`.venv/bin/python benchmarks/plan_validation.py`: the cost model's predictions (deca_p2p/plan.py) "
             "against the committed measurements of `bandwidth_latency.md`, `memory.md` and `checkpoint_cost.md`; nothing is "
             "rerun but a few seconds of checkpoint saves that calibrate this disk. "
             f"Ratio = predicted / measured; within 15% = |ratio - 1| <= {TOL}.", ""]
    comm = bandwidth_latency(lines)
    lines += shared_table()
    mem = memory_rows(lines)
    allr = comm + mem
    good = n_within(allr)
    lines += ["", f"**{good} of {len(allr)} predictions within 15%** (communication {n_within(comm)}"
              f"/{len(comm)}, memory {n_within(mem)}/{len(mem)}).", ""]
    lines += why(comm, mem)
    ckpt = checkpoint_rows(lines)
    ck_good = n_within(ckpt)
    lines += ["", f"**Checkpoints: {ck_good} of {len(ckpt)} within 15%** (later saves "
              f"{n_within(x for x in ckpt if 'later' in x[0])}/{sum('later' in n for n, _, _ in ckpt)})."]
    small_first = [x for x in ckpt if x[0].endswith("full") and not within(x[1], x[2])]
    if small_first:
        lines += ["", "Not within 15%: " + ", ".join(f"{n} ({p / m:.2f}: {1 - p / m:.0%} of the measured save is "
                                                     "beyond the predicted)" for n, p, m in small_first)
                  + ". A first save is `save_pretrained` (its config files, the model's own bookkeeping) and the "
                  "tokenizer's files beside the weights written twice; the plan counts only the weights, which on a "
                  "model of a few MB leaves out a visible part (not measured apart). It happens once per peer process."]
    internet(lines)
    (RESULTS / "plan_validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"HEADLINE plan vs measured: {good}/{len(allr)} within 15%; checkpoints {ck_good}/{len(ckpt)}")


def why(comm: list, mem: list) -> list[str]:
    """Where the predictions miss, and why (the figures from this run's rows)."""
    def span(rows, inv=False):
        rs = [m / p if inv else p / m for _, p, m in rows]
        return f"{min(rs):.2f}-{max(rs):.2f}" if len(rs) > 1 else f"{rs[0]:.2f}"

    def miss(rows):
        return [x for x in rows if not within(x[1], x[2])]

    out = ["Where it is not within 15%, and why:", ""]
    steps8 = [x for x in comm if x[0].startswith("ring8") and x[0].endswith(" step")]
    if miss(steps8):
        out.append(f"- **Step wall on ring8** (8 peers on 2 cores): predicted / measured {span(steps8)}. The plan's "
                   "sharing model has every peer compute at once on the shared cores and then exchange (synchronous "
                   "gossip); the peers drift apart, and some compute while others wait for a neighbour.")
    elif steps8:
        out.append(f"- (within 15%, for the record) **Step wall on ring8** (8 peers on 2 cores): predicted / measured "
                   f"{span(steps8)}, the mean of the two schedules above. Without any model of shared cores (measured "
                   "compute wall + L + S/R + overhead, as with a core per peer) the same rows would be "
                   f"{span(UNSHARED)}, {len(miss(UNSHARED))} of {len(UNSHARED)} outside 15%: with the 30 ms slice a "
                   "step's compute runs mostly whole, and the waiting for a core moved into the exchange.")
    tx = miss([x for x in comm if x[0].endswith("transfer")])
    if tx:
        why_tx = (" With 8 peers on 2 cores a message's delivery waits for CPUs (the receiver's wake-up, the I/O "
                  "threads), which at 1 Gbit/s (S/R = 6.8 ms) is no longer small next to S/R; the plan assumes the "
                  "configured rate." if all(n.startswith("ring8") for n, _, _ in tx) else
                  " The plan assumes the configured rate.")
        out.append("- **Transfer** (predicted / measured time): "
                   + ", ".join(f"{n.replace(' transfer', '')} ({p / m:.2f})" for n, p, m in tx) + "." + why_tx)
    mm = miss(mem)
    if mm:
        under = [x for x in mm if x[1] < x[2]]
        over = [x for x in mm if x[1] >= x[2]]
        if under:
            out.append("- **Memory, under**: " + ", ".join(f"{n} ({p / m:.2f})" for n, p, m in under) + ". The "
                       "prediction counts the tensors the code holds (and, on a CPU, the activations' memory that "
                       "glibc keeps after backward); the measured peak is the kernel's high-water RSS, which also "
                       "holds what the allocator has not yet handed back within an activation (a peer trims the heap "
                       "when it switches blocks), and transient buffers the 10 ms sampler in `memory.md` misses.")
        if over:
            out.append("- **Memory, over**: " + ", ".join(f"{n} ({p / m:.2f})" for n, p, m in over) + ". The "
                       "prediction counts a buffer the measured run did not hold at the moment of its peak.")
    return out + [""]


if __name__ == "__main__":
    main()
