"""`deca-peer plan`: what a run costs before it runs -- a pure cost model (no sockets; no torch but for --calibrate).

Given a model (a preset or an HF ``config.json``), a topology with its links, a codec, R, T, a batch and a compute
speed, it predicts per peer: parameters and bytes per block, bytes per exchange per link, compute /
communication / local-overhead seconds per step (sequential, the default, and overlapped, as with `--overlap`),
seconds per checkpoint, time per round and per run, traffic, and peak memory for DECA, decentralized Adam and Dec-LoRA.

What the model mirrors in the code (and where it is approximate):

* **Parameters** from the architecture numbers (Llama-family decoder: embeddings; per layer q/k/v/o with
  grouped-query attention (``num_key_value_heads``), a gated MLP of three matrices, two RMSNorms, Qwen2's q/k/v
  biases, Qwen3's q/k norms; final norm; an LM head unless tied). Exact for llama / mistral / qwen2 / qwen3
  (tests compare with transformers); other ``model_type`` values are read with the same formula (an estimate).
* **Blocks** as ``blocks.partition``: one block per ``layers_per_block`` decoder layers, plus the embeddings and the
  head blocks when they are trained (``embeddings_block`` / ``head_block``, off by default; a tied head belongs to
  the embeddings block). Decentralized Adam: one block of every parameter; Dec-LoRA: one block of the adapters
  (rank r on every linear layer but the head, peft's ``all-linear``).
* **Bytes per message** as ``wire``: payload 4 B/parameter (raw: float32), 2 B (bf16, fp16), 1 B + a per-tensor
  scale (int8); plus a msgpack header (an estimate per tensor). Every message of an activation has the same size
  (full or delta).
* **Communication** as ``transport`` + ``gossip``: a peer sends its block to every neighbour at once, each link on
  its own sender thread with its own emulated rate, then waits for every neighbour's block; so one exchange costs
  the slowest link, max_j (L_ij + S / R_ij) (``shared_uplink``: the links share one access link, L + degree x S / R).
  The network is synchronous (each step waits for the neighbours), so the slowest peer sets everyone's pace.
* **Compute** = FLOPs / speed + optimizer memory traffic / memory bandwidth. Forward: 2 x matmul parameters x tokens
  (+ attention scores, 4 x tokens x seq x q-width per layer). Backward: DECA computes input gradients only through
  the layers above the active block (1x their forward) and weight gradients only for the active block (counted
  2x its forward, a small overcount): on average about half a forward, so a DECA step costs ~1.5 forwards against
  3 for decentralized Adam (6 x P x tokens); Dec-LoRA computes input gradients through every layer (~2 forwards). Gradient checkpointing adds one forward.
* **Local overhead** per exchange: encode (copy to host; `raw`: a snapshot of θ½, lossy codecs: the delta against the
  public copy), mix (float32 accumulator over self + neighbours) and apply (BMA, copy back), as bytes touched per
  active parameter / host memory bandwidth.
* **Peers sharing cores** (``peers_per_core`` F > 1, e.g. `make cluster`: 8 peers on 2 cores, F = 4; compute speed
  then one peer's on one core; F is rounded to whole cores): each step costs a peer compute + local overhead + transport of CPU, where transport
  is the kernel's copies of the messages (every message sent and received is copied between user and kernel memory:
  2 x TRANSPORT_BYTES x degree x S at the host bandwidth; with a core per peer it runs on other cores while the bytes
  are on the wire, so it is not counted there). Two schedules usually bracket the step: every peer at once (F x
  that CPU, then L + S/R: pessimistic, the peers drift apart and some compute while others wait) and the ideal
  pipeline (plan_shared.py: each job runs as soon as a core is free and its exchange has landed: optimistic, the
  kernel's scheduler is no such oracle). The plan predicts their mean (`shared_bounds`, `step_seconds`): over four
  ring8 runs on this machine that mean was 0.91-1.06 of the measured step, the pessimistic schedule alone 1.00-1.22,
  the optimistic 0.75-1.06 (`plan_validation.md`, which says which run chose the mean and which checked it).
* **Checkpoints** (plan_checkpoint.py): a save after every activation (`checkpoint_every`: every N-th, and each
  round's last), the blocks trained since the last save (DECA) or the whole model (the baselines), at the disk's
  checkpoint rate plus a fixed part, added to the round (no exchange hides it); a process's first save, which writes
  more, once to the run.
* **Memory** per peer, as held by ``blocks.ActiveBlock``, ``optim.DECA``, ``optim.MixAccumulator``,
  ``public_copy.PublicCopy`` and ``gossip``: the whole model in its working dtype; per *active* parameter, at the mix, a
  float32 master copy (when the working dtype is not float32), the float32 gradient, m and v, θ_r kept between
  local step and mix, the float32 mix accumulator, which is the result (20 B, +4 B master, +4 B for the previous
  step's result a peer still holds); what the exchange holds (`raw`: the neighbours' blocks until the mix, 4 x
  degree B, plus on a GPU the host copy of the block sent, 4 B; lossy codecs: own public copy, outgoing delta and
  one public copy per neighbour, 8 + 4 x degree B; in host memory); float64 temporaries of at most F64_CHUNK
  elements (norms and distances are summed a chunk at a time) and, at the mix, one tensor's discrepancy in float32
  (the optimizer works on float32 copies); in backward, the activations (saved tensors per layer and token, the
  logits with their float32 loss copy and gradient). The peak is the largest of the phases (see `memory`). On a GPU the device holds the model, the optimizer state, the mix
  and the activations; the public copies live in host memory.

Every number is a model prediction; `benchmarks/plan_validation.py` checks it against this machine's measurements.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .plan_arch import (  # noqa: F401  (plan.X stays the one name users and tests read)
    METHODS, CODEC_BYTES, DTYPE_BYTES, HEADER_BASE_BYTES, HEADER_TENSOR_BYTES, GiB, PRESETS, PlanError, Arch,
    EXACT_TYPES, arch_from_config, load_arch, _linears, layer_tensors, layer_params, embedding_params, head_params,
    total_params, lora_layer_params, BlockCost, make_blocks, message_bytes,
)
from .plan_checkpoint import calibrate_disk, checkpoint_cost, save_bytes
from .plan_report import fmt_bytes, fmt_s, render  # noqa: F401
from .plan_shared import shared_cores_step


# ------------------------------------------------------------------------------------------------ compute

def layer_forward_flops(a: Arch, tokens: int, seq: int) -> float:
    """One decoder layer's forward FLOPs: 2 x weights x tokens, + QK^T and AV (4 x tokens x seq x q-width)."""
    mats = sum(i * o for _, i, o, _ in _linears(a))
    return 2.0 * mats * tokens + 4.0 * tokens * seq * a.heads * a.head_dim


def head_forward_flops(a: Arch, tokens: int) -> float:
    return 2.0 * a.vocab * a.hidden * tokens  # the LM head matmul, tied or not


def step_flops(a: Arch, method: str, block: BlockCost, tokens: int, seq: int, *, lora_rank: int = 8,
               checkpointing: bool = False) -> float:
    """FLOPs of one local step (forward + backward) with `block` active."""
    f_layer, f_head = layer_forward_flops(a, tokens, seq), head_forward_flops(a, tokens)
    fwd = a.layers * f_layer + f_head
    if method == "dadam":
        bwd = 2 * fwd
    elif method == "declora":
        lora = 2.0 * lora_layer_params(a, lora_rank) * tokens * a.layers
        fwd += lora
        bwd = a.layers * f_layer + f_head + 2 * lora  # input gradients through every layer; adapters' own
    else:
        if block.layers is None:  # embeddings: input gradients through everything, weight gradient a scatter-add
            bwd = fwd
        else:
            first, last = block.layers
            above = (a.layers - last) * f_layer + f_head
            # input gradients through the layers above and the active one (its lowest layer needs none below it
            # but we count it: one layer's input gradient, a small overcount); weight gradients of the active block
            bwd = above + (last - first) * f_layer * 2 if last > first else f_head  # head block: its weight grad
    if checkpointing:
        fwd *= 2
    return fwd + bwd


OPT_BYTES_PER_PARAM = 64     # Adam step: grad, m, v, p read/written, θ_r clone, float64 gradient norm temporaries
F64_CHUNK = 1 << 20          # = optim.F64_CHUNK (a test checks; this module stays free of torch)
# bytes touched per active parameter and exchange: encode + apply, and per mixed source (self + each; the float32
# accumulator: read the source, read and write the sum; a neighbour's block is also scanned for NaN/Inf once).
# raw sends θ½ whole (a snapshot: read + write); a lossy codec's delta reads θ½ and θ̂, writes the delta, adds the
# decoded delta into θ̂; apply (BMA, copy back) is the same for both
OVERHEAD_BYTES = {"raw": (24, 16), "lossy": (40, 16)}
# bytes of host memory traffic per byte of a message sent or received: the kernel copies it between user and kernel
# memory (read + write) on the way out and again on the way in
TRANSPORT_BYTES = 2


# a checkpoint on a local disk, about as measured here (checkpoint_cost.md: a 29.8 MB shard in 30-38 ms, 0.85 MB in 3-6 ms);
# `plan --calibrate` times the disk it runs on, `--disk-bw` gives another
DISK_BW = 1e9
SAVE_S = 0.005


@dataclass
class Device:
    kind: str                # cpu | gpu | consumer-gpu | calibrated: <what>
    flops: float             # effective FLOP/s of a training step
    mem_bw: float            # bytes/s of the optimizer's memory traffic (device)
    host_bw: float           # bytes/s of the exchange's host-side passes (encode, public copies, mix)
    runtime_bytes: int = 0   # fixed memory of the runtime (torch, transformers) beside the model
    on_gpu: bool = False     # the public copies then live in host memory, the rest on the device
    disk_bw: float = DISK_BW  # bytes/s of a checkpoint's weights: safetensors serialization, write and fsync
    save_s: float = SAVE_S    # fixed seconds of one checkpoint: its files' and directories' fsyncs, renames, links


DEVICES = {  # defaults per device class (effective, not peak: ~40% of peak FLOP/s for GPUs)
    "cpu": Device("cpu", 5e10, 5e9, 5e9, int(0.35 * GiB)),
    "gpu": Device("gpu (H100/H200 class)", 4e14, 2e12, 1e10, int(0.5 * GiB), True),
    "consumer-gpu": Device("consumer-gpu (RTX 3090/4090 class)", 6e13, 7e11, 1e10, int(0.5 * GiB), True),
}


def calibrate(device: str = "auto", seconds: float = 3.0, disk_dir: str | None = ".") -> Device:
    """Time a scaled-down Llama's forward+backward and a large elementwise add on this machine's CPU or GPU, and a
    checkpoint's writes in DISK_DIR (plan_checkpoint.calibrate_disk; None: the default disk). The exchange's host-side
    passes keep the device class's rate."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        raise PlanError(f"--calibrate needs torch ({e})") from None
    import time

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PlanError("--calibrate on cuda asked for, but torch sees no CUDA device")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h, i, n_layers, tokens = (2048, 8192, 4, 8192) if dev.type == "cuda" else (512, 1408, 2, 512)
    torch.manual_seed(0)
    ws = [torch.randn(h, i, device=dev, dtype=dtype, requires_grad=True) * 0.02 for _ in range(n_layers)]
    ws = [w.detach().requires_grad_(True) for w in ws]
    x = torch.randn(tokens, h, device=dev, dtype=dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        y = x
        for w in ws:
            y = torch.nn.functional.silu(y @ w) @ w.t()
        y.float().pow(2).mean().backward()

    step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2 or n < 2:
        step()
        n += 1
    sync()
    dt = (time.perf_counter() - t0) / n
    flops = 3 * 2 * 2 * tokens * h * i * n_layers / dt  # forward 2 matmuls per layer, backward 2x
    a = torch.ones(32 << 20 if dev.type == "cuda" else 64 << 20, device=dev)  # 256 MiB on a CPU: beyond its caches
    b = torch.ones_like(a)
    a.add_(b)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4 or n < 3:
        a.add_(b)
        n += 1
    sync()
    bw = 3 * a.numel() * 4 * n / (time.perf_counter() - t0)  # read a, read b, write a
    base = DEVICES["cpu" if dev.type == "cpu" else "gpu"]
    # the exchange's host passes keep the class's effective rate, the one plan_validation checks (5 GB/s on a CPU: many
    # small tensors, Python between them); a streaming add measured 24-84 GB/s here and would under-predict them
    host = base.host_bw
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    disk_bw, save_s = (DISK_BW, SAVE_S) if disk_dir is None else calibrate_disk(disk_dir)
    return Device(f"calibrated: {name}", flops, bw, host, base.runtime_bytes, dev.type == "cuda", disk_bw, save_s)


# ------------------------------------------------------------------------------------------------ memory

def activation_bytes(a: Arch, tokens: int, n_layers: int, wd: int, checkpointing: bool = False) -> float:
    """Saved tensors for backward: per layer and token (norm inputs in float32; q, k, v, attention output, MLP
    gate/up/product in the working dtype), and the logits (working dtype) with their float32 loss copy and gradient."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    per_layer = wd * (4 * a.hidden + 2 * q + 2 * kv + 3 * a.intermediate) + 4 * 2 * a.hidden
    if checkpointing:
        per_layer = wd * a.hidden  # only each layer's input is kept (+ one layer recomputed, below)
        n_layers = n_layers + 1
    logits = (wd + 8) * tokens * a.vocab
    return per_layer * tokens * n_layers + logits


@dataclass
class Memory:
    device_bytes: float      # weights + optimizer state + mix + activations (+ runtime on CPU)
    host_bytes: float        # public copies (GPU peers; on CPU they are in device_bytes too)
    parts: dict[str, float] = field(default_factory=dict)


def memory(a: Arch, method: str, blocks: list[BlockCost], degree: int, tokens: int, dtype: str, on_gpu: bool,
           runtime_bytes: int = 0, lora_rank: int = 8, checkpointing: bool = False,
           holds_previous_mix: bool = True, codec: str = "raw") -> Memory:
    """Peak memory of one peer: the maximum over its blocks and over the three phases of a step of what is held
    (see the module doc). Per active parameter, with m = 4 B for a float32 master copy (working dtype not float32):

    * backward:     m + m, v (8) + the working-dtype gradient + the activations;
    * gradient norm (start of the Adam step): m + float32 gradient (4) + m, v (8) + one float64 chunk (8 B x
                    F64_CHUNK elements, or the largest tensor when smaller);
    * mix:          m + gradient (4) + m, v (8) + θ_r (4) + the float32 accumulator, which is the result (4)
                    + the discrepancy of the largest tensor in float32 + one float64 chunk (the
                    distances to the neighbours, the moments' statistics);
    * checkpoint (Dec-LoRA only): the merged copy of the whole model every save exports, in the working dtype,
                    beside the adapters' m, v (8).

    A real peer (`peer.py`) still holds the previous step's mixed result (4 B) in every phase
    (`holds_previous_mix`; `benchmarks/memory.py` drops it). On a CPU the activations count in every phase (freed
    activation memory stays with glibc's allocator: RSS does not fall after backward, measured in memory.md); on a
    GPU the caching allocator reuses it, so only the backward phase has them. What the exchange holds is in host memory on
    a GPU, beside the rest on a CPU: with `raw` (protocol v3: whole blocks) the neighbours' blocks received until the
    mix (4 x degree B, nothing kept between exchanges) and, on a GPU, the host copy of the block being sent (4 B; on a
    CPU a blocking peer sends θ½ itself, zero-copy: gossip.py; `--overlap` keeps a snapshot, 4 B more); with a lossy
    codec the public copies (own, outgoing delta, one per neighbour: 8 + 4 x degree B).
    """
    wd = DTYPE_BYTES[dtype]
    weights = wd * total_params(a)
    if method == "declora":
        weights += 4 * blocks[0].params  # peft keeps the adapters in float32
    best = None
    for b in blocks:
        master = 4 if (wd != 4 and method != "declora") else 0
        prev = 4 if holds_previous_mix else 0
        if method == "deca" and b.layers is not None and b.layers[0] == b.layers[1] == a.layers:
            saved = 0                                        # head block: the logits only
        elif method == "deca" and b.layers is not None:
            saved = a.layers - b.layers[0]                   # layers from the active block up
        else:
            saved = a.layers                                 # embeddings block, dadam, declora: every layer
        act = activation_bytes(a, tokens, saved, wd, checkpointing)
        # on a CPU the activations' memory stays with glibc's allocator after backward (RSS does not fall), so the
        # later phases add to it; a GPU's caching allocator reuses it (max_memory_allocated counts live tensors)
        kept = 0 if on_gpu else act
        chunk = 8 * min(b.largest, F64_CHUNK)  # a float64 temporary (optim.f64_sum, robust.sq_distance)
        phases = {"backward": (master + 8 + prev + (wd if master else 0)) * b.params + act,
                  "gradient norm": (master + 4 + 8 + prev) * b.params + chunk + kept,
                  "mix": (master + 20 + prev) * b.params + 4 * b.largest + chunk + kept}
        if method == "declora":  # a checkpoint merges a deep copy of the whole model (lora.merged): a second model
            phases["checkpoint"] = wd * total_params(a) + (8 + prev) * b.params + kept
        phase = max(phases, key=phases.get)
        # raw: the neighbours' blocks until the mix (+ on a GPU the host copy sent; a CPU peer sends θ½ zero-copy);
        # lossy: own public copy, outgoing delta, neighbours' copies (none without a neighbour: nothing is exchanged)
        sent_copy = (4 if on_gpu else 0) if codec == "raw" else 8
        copies = (sent_copy + 4 * degree) * b.params if degree else 0
        dev = weights + phases[phase] + (0 if on_gpu else copies + runtime_bytes)
        if best is None or dev > best.device_bytes:
            best = Memory(dev, copies if on_gpu else 0.0,
                          {"weights": weights, "peak_phase": phase, "phase_bytes": phases[phase],
                           "optimizer_and_mix": (master + 20) * b.params, "activations": act,
                           "public_copies": copies, "runtime": 0 if on_gpu else runtime_bytes, "block": b.name})
    return best


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class PlanInputs:
    method: str = "deca"
    codec: str = "raw"
    inner_steps: int = 8
    rounds: int = 24
    batch_size: int = 16
    seq_len: int = 512
    dtype: str = "bfloat16"
    gossip_every: int = 1
    embeddings_block: bool = False
    head_block: bool = False
    layers_per_block: int = 1
    lora_rank: int = 8
    gradient_checkpointing: bool = False
    shared_uplink: bool = False
    peers_per_core: float = 1.0  # > 1: peers share a host's cores (make cluster here: 8 peers / 2 cores = 4)
    checkpoint_every: int = 1    # a checkpoint every N activations (and at the end of each round), as the peer's option

    def check(self) -> "PlanInputs":
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}; choose {', '.join(METHODS)}")
        if self.codec not in CODEC_BYTES:
            raise PlanError(f"unknown codec {self.codec!r}; choose {', '.join(CODEC_BYTES)}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPE_BYTES)}")
        for k in ("inner_steps", "rounds", "batch_size", "seq_len", "gossip_every", "layers_per_block", "lora_rank",
                  "checkpoint_every"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PlanError(f"{k.replace('_', '-')} must be a positive integer, got {v!r}")
        f = self.peers_per_core
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (1 <= f < float("inf")):
            raise PlanError(f"peers-per-core must be a number >= 1 (1: every peer has a core of its own), got {f!r}")
        return self


def _link_seconds(link, nbytes: int) -> tuple[float, float]:
    lat = (link.latency_ms or 0.0) / 1e3 + (getattr(link, "jitter_ms", 0.0) or 0.0) / 2e3
    tx = 0.0 if link.bandwidth_mbps is None else nbytes * 8 / (link.bandwidth_mbps * 1e6)
    return lat, tx


def exchange_cpu_seconds(params: int, msg_bytes: float, degree: int, codec: str, host_bw: float) -> tuple[float, float]:
    """(local overhead, transport) CPU seconds of one exchange of a block of PARAMS parameters sent as MSG_BYTES to
    each of DEGREE neighbours: the encode / mix / apply passes (OVERHEAD_BYTES) and the kernel's copies of every
    message sent and received (TRANSPORT_BYTES each way), at HOST_BW. Nothing without a neighbour."""
    if not degree:
        return 0.0, 0.0
    fixed, per_source = OVERHEAD_BYTES["raw" if codec == "raw" else "lossy"]
    return ((fixed + per_source * (degree + 1)) * params / host_bw,
            2 * TRANSPORT_BYTES * degree * msg_bytes / host_bw)  # sent and received, each copied once


def shared_bounds(compute: float, comm: float, local: float, transport: float, ex_share: float,
                  peers_per_core: float, neighbours: Mapping[int, Sequence[int]]) -> dict[str, tuple[float, float]]:
    """Two schedules that usually bracket a step of peers sharing cores (PEERS_PER_CORE > 1, rounded to whole cores:
    the module doc): the ideal pipeline (plan_shared.py: jobs run as soon as a core and their exchange allow;
    optimistic) and every peer at once (peers / cores x the CPU, then the exchange; pessimistic).
    {"seq": (pipeline, all at once), "overlap": (...)}."""
    cores = max(1, round(len(neighbours) / peers_per_core))
    f = len(neighbours) / cores  # the peers per core that whole cores give (F > peers: one core for all)
    cpu = compute + ex_share * (local + transport)
    pipe = [shared_cores_step(cpu, ex_share * comm, neighbours, cores, overlap=o) for o in (False, True)]
    return {"seq": (pipe[0], f * cpu + ex_share * comm),
            "overlap": (pipe[1], max(f * (compute + ex_share * transport), ex_share * comm) + f * ex_share * local)}


def step_seconds(compute: float, comm: float, local: float, transport: float, ex_share: float = 1.0,
                 peers_per_core: float = 1.0, neighbours: Mapping[int, Sequence[int]] | None = None) -> tuple[float, float]:
    """(sequential, overlapped) seconds of one local step: compute, then EX_SHARE of an exchange (comm on the wire,
    local overhead and transport on the CPU). With a core per peer the kernel's copies run beside the wire. With
    PEERS_PER_CORE F > 1 (NEIGHBOURS: every peer's neighbours, all on one pool of cores) the mean of the two
    schedules of `shared_bounds` (the module doc says why)."""
    if peers_per_core > 1:
        if neighbours is None:
            raise PlanError("peers sharing cores: the step needs the topology's neighbours")
        b = shared_bounds(compute, comm, local, transport, ex_share, peers_per_core, neighbours)
        return sum(b["seq"]) / 2, sum(b["overlap"]) / 2
    return compute + ex_share * (comm + local), max(compute, ex_share * comm) + ex_share * local


def method_cost(a: Arch, topo, inp: PlanInputs, device: Device, method: str) -> dict[str, Any]:
    """Per-peer and network costs of one method at DECA's step count (T x blocks x R local steps)."""
    deca_blocks = make_blocks(a, "deca", embeddings_block=inp.embeddings_block, head_block=inp.head_block,
                              layers_per_block=inp.layers_per_block)
    blocks = make_blocks(a, method, embeddings_block=inp.embeddings_block, head_block=inp.head_block,
                         layers_per_block=inp.layers_per_block, lora_rank=inp.lora_rank)
    steps_per_round = len(deca_blocks) * inp.inner_steps
    exchanges_per_act = sum(1 for s in range(inp.inner_steps)
                            if (s + 1) % inp.gossip_every == 0 or s == inp.inner_steps - 1)
    tokens = inp.batch_size * inp.seq_len
    on_gpu = device.on_gpu
    # per block: compute and local overhead per step (DECA cycles over its blocks; the others train one block)
    per_block = []
    for b in blocks:
        fl = step_flops(a, method, b, tokens, inp.seq_len, lora_rank=inp.lora_rank,
                        checkpointing=inp.gradient_checkpointing)
        compute = fl / device.flops + OPT_BYTES_PER_PARAM * b.params / device.mem_bw
        per_block.append((b, fl, compute))
    if method == "deca":
        weights = [1.0] * len(per_block)
    else:
        weights = [float(len(deca_blocks))]  # the same number of local steps per round as DECA
    nb = sum(weights)
    mean_compute = sum(w * c for w, (_, _, c) in zip(weights, per_block)) / nb
    mean_flops = sum(w * f for w, (_, f, _) in zip(weights, per_block)) / nb
    peers = []
    neighbours = {i: topo.neighbors(i) for i in topo.nodes}
    # checkpoints (plan_checkpoint.py): the same for every peer; peers sharing a host's cores share its disk
    later, first = save_bytes(a, method, blocks, inp.dtype)
    writers = len(topo.nodes) if inp.peers_per_core > 1 else 1
    ck = checkpoint_cost(method, later, first, len(deca_blocks), inp.rounds, inp.checkpoint_every, device.disk_bw,
                         device.save_s, writers)
    steps_memo: dict[tuple, tuple[float, float]] = {}
    for i in topo.nodes:
        nbrs = neighbours[i]
        deg = len(nbrs)
        step_comm, step_local, step_transport, link_bytes = [], [], [], []
        round_time_seq = round_time_ovl = 0.0
        sent_round = 0.0
        for w, (b, _, compute) in zip(weights, per_block):
            s = message_bytes(b, inp.codec)
            links = [_link_seconds(topo.link(i, j), s) for j in nbrs]
            if not links:
                comm = 0.0
            elif inp.shared_uplink:
                comm = max(lat for lat, _ in links) + sum(tx for _, tx in links)
            else:
                comm = max(lat + tx for lat, tx in links)
            local, transport = exchange_cpu_seconds(b.params, s, deg, inp.codec, device.host_bw)
            ex_share = exchanges_per_act / inp.inner_steps
            key = (compute, comm, local, transport, ex_share)  # equal for peers of one degree and blocks of one size:
            if key not in steps_memo:                          # the shared-cores replay is run once per kind
                steps_memo[key] = step_seconds(compute, comm, local, transport, ex_share, inp.peers_per_core,
                                               neighbours)
            step_seq, step_ovl = steps_memo[key]
            n_steps = w * inp.inner_steps
            round_time_seq += n_steps * step_seq
            round_time_ovl += n_steps * step_ovl
            sent_round += w * exchanges_per_act * deg * s
            step_comm.append((w, comm))
            step_local.append((w, local))
            step_transport.append((w, transport))
            link_bytes.append((w, s))
        step_s, step_overlap_s = round_time_seq / steps_per_round, round_time_ovl / steps_per_round
        round_time_seq += ck["seconds_per_round"]
        round_time_ovl += ck["seconds_per_round"]  # a save waits for the activation's last exchange: nothing hides it
        wavg = lambda xs: sum(w * x for w, x in xs) / nb  # noqa: E731
        mem = memory(a, method, blocks, deg, tokens, inp.dtype, on_gpu, device.runtime_bytes, inp.lora_rank,
                     inp.gradient_checkpointing, codec=inp.codec)
        slow = max(nbrs, key=lambda j: sum(_link_seconds(topo.link(i, j), 10**6)), default=None)
        peers.append({
            "peer": i, "degree": deg,
            "slowest_link": None if slow is None else _fmt_link(topo.link(i, slow)),
            "bytes_per_exchange_per_link": wavg(link_bytes),
            "compute_s": mean_compute, "comm_s": wavg(step_comm), "local_s": wavg(step_local),
            "transport_s": wavg(step_transport), "peers_per_core": inp.peers_per_core,
            "step_s": step_s, "step_overlap_s": step_overlap_s,
            "checkpoint_s": ck["seconds_per_save"], "checkpoints_per_round": ck["saves_per_round"],
            "checkpoint_bytes": ck["bytes_per_save"], "first_checkpoint_bytes": first,
            "round_s": round_time_seq, "round_overlap_s": round_time_ovl,
            "run_s": round_time_seq * inp.rounds + ck["first_extra_s"],
            "run_overlap_s": round_time_ovl * inp.rounds + ck["first_extra_s"],
            "sent_bytes_run": sent_round * inp.rounds,
            "memory_device_bytes": mem.device_bytes, "memory_host_bytes": mem.host_bytes, "memory_parts": mem.parts,
        })
    slowest = max(peers, key=lambda p: p["round_s"])
    slowest_ovl = max(peers, key=lambda p: p["round_overlap_s"])
    return {
        "method": method, "trainable_params_per_step": sum(w * b.params for w, (b, _, _) in zip(weights, per_block)) / nb,
        "steps_per_round": steps_per_round, "flops_per_step": mean_flops,
        "peers": peers,
        "network": {"step_s": slowest["step_s"], "step_overlap_s": slowest_ovl["step_overlap_s"],
                    "round_s": slowest["round_s"], "run_s": slowest["run_s"],
                    "run_overlap_s": slowest_ovl["run_overlap_s"],
                    "traffic_bytes_run": sum(p["sent_bytes_run"] for p in peers),
                    "max_memory_device_bytes": max(p["memory_device_bytes"] for p in peers),
                    "max_memory_host_bytes": max(p["memory_host_bytes"] for p in peers)},
    }


def _fmt_link(link) -> str:
    bw = "unlimited" if link.bandwidth_mbps is None else f"{link.bandwidth_mbps:g} Mbit/s"
    return f"{link.latency_ms:g} ms, {bw}"


def make_plan(a: Arch, topo, inp: PlanInputs, device: Device) -> dict[str, Any]:
    """The whole prediction as a JSON-able dict."""
    inp.check()
    blocks = make_blocks(a, inp.method, embeddings_block=inp.embeddings_block, head_block=inp.head_block,
                         layers_per_block=inp.layers_per_block, lora_rank=inp.lora_rank)
    return {
        "model": {"name": a.name, "model_type": a.model_type, "params": total_params(a), "layers": a.layers,
                  "hidden": a.hidden, "vocab": a.vocab, "tied": a.tied, "exact_formula": a.exact,
                  "layer_params": layer_params(a), "embedding_params": embedding_params(a),
                  "head_params": head_params(a)},
        "topology": {"name": topo.name, "peers": len(topo.nodes), "edges": len(topo.edges)},
        "inputs": asdict(inp),
        "device": asdict(device),
        "blocks": [{"name": b.name, "params": b.params, "bytes": {c: message_bytes(b, c) for c in CODEC_BYTES}}
                   for b in blocks],
        "methods": {m: method_cost(a, topo, inp, device, m) for m in METHODS},
    }


