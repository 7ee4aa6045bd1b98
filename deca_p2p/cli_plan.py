"""`deca-peer plan`: what a run will cost, before it starts (plan.py is the model). cli.py adds it to `deca-peer`."""
from __future__ import annotations

import click

from .cli_common import fail, load_topology


@click.command("plan")
@click.option("--model", "model_spec", required=True,
              help="A preset (llama-3-8b, llama-3.2-1b, qwen2.5-0.5b, ...) or an HF config.json / model directory.")
@click.option("--topology", "topology_file", required=True, type=click.Path(dir_okay=False),
              help="Topology JSON with its links (latency_ms, bandwidth_mbps).")
@click.option("--algo", "method", default="deca", show_default=True,
              help="Method of the per-peer table: deca, dadam or declora (all three are compared).")
@click.option("--codec", default="raw", show_default=True, help="raw, bf16, fp16 or int8.")
@click.option("--inner-steps", default="8", show_default=True, help="R: local steps per block activation.")
@click.option("--rounds", default="24", show_default=True, help="T: rounds over all blocks.")
@click.option("--batch-size", default="16", show_default=True, help="Sequences per local step.")
@click.option("--seq-len", default="512", show_default=True, help="Tokens per sequence.")
@click.option("--dtype", default=None, help="Working dtype (default: bfloat16 on a GPU, float32 on a CPU).")
@click.option("--gossip-every", default="1", show_default=True, help="Exchange after every c-th inner step.")
@click.option("--layers-per-block", default="1", show_default=True)
@click.option("--lora-rank", default="8", show_default=True, help="Dec-LoRA's rank.")
@click.option("--embeddings-block", is_flag=True, help="Train the embeddings as an extra DECA block.")
@click.option("--head-block", is_flag=True, help="Train the final norm + LM head as an extra DECA block.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--shared-uplink", is_flag=True,
              help="A peer's links share one access link (degree x bytes / bandwidth); default: independent links, "
                   "as the emulator runs them.")
@click.option("--peers-per-core", default="1", show_default=True,
              help="Peers sharing each core of a host (make cluster here: 8 peers / 2 cores = 4); the compute speed "
                   "is then one peer's on one core.")
@click.option("--device", "device_class", default="gpu", show_default=True,
              help="Default speeds of a device class: cpu, gpu (H100/H200), consumer-gpu (RTX 3090/4090).")
@click.option("--calibrate", is_flag=True,
              help="Measure FLOP/s and memory bandwidth on this machine (auto: cuda or cpu), and checkpoint writes in "
                   "the current directory.")
@click.option("--flops", default=None, help="Effective FLOP/s of a training step (overrides the device class).")
@click.option("--mem-bw", default=None, help="Memory bandwidth in bytes/s (overrides the device class).")
@click.option("--checkpoint-every", default="1", show_default=True,
              help="A checkpoint every N activations (and at the end of each round), as `start`'s option.")
@click.option("--disk-bw", default=None,
              help="Checkpoint write rate in bytes/s (serialization, write, fsync; overrides the default or --calibrate's).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole prediction as JSON.")
def plan_cmd(model_spec, topology_file, method, codec, inner_steps, rounds, batch_size, seq_len, dtype, gossip_every,
             layers_per_block, lora_rank, embeddings_block, head_block, gradient_checkpointing, shared_uplink,
             peers_per_core, device_class, calibrate, flops, mem_bw, checkpoint_every, disk_bw, as_json) -> None:
    """Predict what a run costs: time per step / round / run, traffic and memory per peer (a model, not a run).

    \b
    deca-peer plan --model llama-3-8b --topology topologies/exp16.json --codec bf16 --flops 4e14
    deca-peer plan --model /models/my-llama/config.json --topology ring8.json --calibrate --json
    """
    import dataclasses
    import json

    from deca_p2p import plan

    def number(name: str, value, kind=int):
        try:
            v = kind(value)
        except (TypeError, ValueError):
            fail(f"--{name} must be a {'positive integer' if kind is int else 'positive number'}, got {value!r}")
        if not (v > 0) or (kind is float and v == float("inf")):
            fail(f"--{name} must be {'a positive integer' if kind is int else 'a positive finite number'}, got {value!r}")
        return v

    ints = {k: number(k.replace("_", "-"), v) for k, v in
            (("inner_steps", inner_steps), ("rounds", rounds), ("batch_size", batch_size), ("seq_len", seq_len),
             ("gossip_every", gossip_every), ("layers_per_block", layers_per_block), ("lora_rank", lora_rank),
             ("checkpoint_every", checkpoint_every))}
    if calibrate and flops is not None:
        fail("give --calibrate (measure here) or --flops X (a given speed), not both")
    share = number("peers-per-core", peers_per_core, float)
    if share < 1:
        fail(f"--peers-per-core must be at least 1 (1: every peer has a core of its own), got {peers_per_core!r}")
    topo = load_topology(topology_file)
    try:
        arch = plan.load_arch(model_spec)
        disk = None if disk_bw is None else number("disk-bw", disk_bw, float)
        if calibrate:
            device = plan.calibrate("auto", disk_dir="." if disk is None else None)
        else:
            if device_class not in plan.DEVICES:
                fail(f"--device must be one of {', '.join(plan.DEVICES)}, got {device_class!r}")
            device = plan.DEVICES[device_class]
        if flops is not None:
            device = dataclasses.replace(device, flops=number("flops", flops, float), kind=f"given: {device.kind}")
        if mem_bw is not None:
            device = dataclasses.replace(device, mem_bw=number("mem-bw", mem_bw, float))
        if disk is not None:
            device = dataclasses.replace(device, disk_bw=disk)
        inp = plan.PlanInputs(method=method, codec=codec, dtype=dtype or ("bfloat16" if device.on_gpu else "float32"),
                              embeddings_block=embeddings_block, head_block=head_block,
                              gradient_checkpointing=gradient_checkpointing, shared_uplink=shared_uplink,
                              peers_per_core=share, **ints)
        result = plan.make_plan(arch, topo, inp, device)
    except plan.PlanError as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        plan.render(result)
