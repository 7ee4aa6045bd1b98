"""`deca-peer plan`: the cost model's parameter counts, blocks, bytes, time and memory arithmetic, and its CLI."""
import json
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd
from deca_p2p import plan
from deca_p2p.plan_shared import shared_cores_step
from deca_p2p.topology import generate

RING8 = REPO / "topologies" / "ring8.json"


# ------------------------------------------------------------------------------------------ parameter counts

@pytest.mark.parametrize("name, total", [
    ("qwen2.5-0.5b", 494_032_768),     # tied embeddings, q/k/v biases (the 494 M of its model card)
    ("llama-3-8b", 8_030_261_248),     # ~8.03 B
    ("llama-3.2-1b", 1_235_814_400),   # ~1.24 B, tied
])
def test_preset_totals(name, total):
    assert plan.total_params(plan.load_arch(name)) == total


def test_preset_names_are_case_insensitive():
    assert plan.load_arch("Llama-3-8B") == plan.load_arch("llama-3-8b")


TINY = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False),
    "llama-bias": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=50, tie_word_embeddings=True, attention_bias=True,
                       mlp_bias=True),
    "qwen2": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=77, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=77, tie_word_embeddings=False),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False),
}


def _real_model(kind: str, device: str = "meta"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mt = kind.split("-")[0]
    cfg = AutoConfig.for_model(mt, **TINY[kind])
    with torch.device(device):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg), cfg


@pytest.mark.parametrize("kind", list(TINY))
def test_counts_equal_a_real_transformers_model(kind, tmp_path):
    model, cfg = _real_model(kind)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    a = plan.load_arch(str(tmp_path / "config.json"))
    assert a.exact
    assert plan.total_params(a) == sum(p.numel() for p in model.parameters())
    assert plan.total_params(plan.load_arch(str(tmp_path))) == plan.total_params(a)  # a model directory: its config.json


@pytest.mark.parametrize("kind, lpb, emb, head", [("llama", 1, True, True), ("llama", 2, False, True),
                                                  ("qwen2", 2, True, True), ("qwen3", 1, False, False)])
def test_blocks_match_the_real_partition(kind, lpb, emb, head, tmp_path):
    import torch

    from deca_p2p.blocks import partition

    torch.set_num_threads(1)
    model, cfg = _real_model(kind, "cpu")
    real = partition(model, embeddings=emb, head=head, layers_per_block=lpb)
    named = dict(model.named_parameters())
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    mine = plan.make_blocks(plan.load_arch(str(tmp_path)), "deca", embeddings_block=emb, head_block=head,
                            layers_per_block=lpb)
    assert [b.name for b in mine] == [b.name for b in real]
    assert [b.params for b in mine] == [sum(named[n].numel() for n in b.param_names) for b in real]
    assert [b.tensors for b in mine] == [len(b.param_names) for b in real]
    assert [b.largest for b in mine] == [max(named[n].numel() for n in b.param_names) for b in real]


def test_lora_block_matches_peft(tmp_path):
    import torch

    from deca_p2p import lora
    from deca_p2p.config import TrainConfig

    torch.set_num_threads(1)
    model, cfg = _real_model("llama", "cpu")
    wrapped = lora.wrap(model, TrainConfig(lora_rank=4))
    named = dict(wrapped.named_parameters())
    names = lora.adapter_names(wrapped)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    (blk,) = plan.make_blocks(plan.load_arch(str(tmp_path)), "declora", lora_rank=4)
    assert blk.params == sum(named[n].numel() for n in names)
    assert blk.tensors == len(names)


# ------------------------------------------------------------------------------------------ bytes

def test_bytes_per_codec_match_the_wire(deca_cache):
    import torch

    from deca_p2p import wire
    from deca_p2p.models import load_model

    torch.set_num_threads(1)
    model, _ = load_model(deca_cache)
    blk = {n: p.detach() for n, p in model.named_parameters() if n.startswith("model.layers.0.")}
    (b,) = plan.make_blocks(plan.load_arch(str(deca_cache)), "deca")[:1]
    for codec, per in (("raw", 4), ("bf16", 2), ("fp16", 2), ("int8", 1)):
        frames = wire.encode(wire.Message(kind="block", src=3, inc=123456, round=10, block=2, step=7, codec=codec,
                                          full=True, tensors=blk,
                                          stats={"loss": 1.0, "grad_norm": 2.0, "lr": 1e-3, "sent_at": 1.7e9}))
        real = sum(memoryview(f).nbytes for f in frames)
        predicted = plan.message_bytes(b, codec)
        assert predicted - b.params * per < 2000  # the header is the only addition
        assert abs(predicted - real) / real < 0.002, (codec, predicted, real)


def test_unknown_codec():
    (b,) = plan.make_blocks(plan.load_arch("llama-3-8b"), "dadam")
    with pytest.raises(plan.PlanError, match="codec"):
        plan.message_bytes(b, "zip")


# ------------------------------------------------------------------------------------------ time

def _topo(kind="ring", n=8, **link):
    return generate(kind, n, link=link or None)


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-3-8b"])
@pytest.mark.parametrize("link", [{}, {"latency_ms": 50, "bandwidth_mbps": 1000}, {"latency_ms": 5, "bandwidth_mbps": 100}])
@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_overlap_never_slower_than_sequential(model, link, device):
    p = plan.make_plan(plan.load_arch(model), _topo(**link), plan.PlanInputs(inner_steps=4, rounds=2, seq_len=256,
                                                                             gossip_every=2), plan.DEVICES[device])
    for cost in p["methods"].values():
        for peer in cost["peers"]:
            assert peer["step_overlap_s"] <= peer["step_s"] + 1e-12
            assert peer["run_overlap_s"] <= peer["run_s"] + 1e-9
            assert peer["step_overlap_s"] >= max(peer["compute_s"], 0) - 1e-12


def test_comm_is_the_slowest_link():
    a = plan.load_arch("qwen2.5-0.5b")
    t = _topo(latency_ms=20, bandwidth_mbps=100)
    t.links["0-1"] = type(t.links["default"])(latency_ms=80, bandwidth_mbps=50)
    p = plan.make_plan(a, t, plan.PlanInputs(codec="bf16"), plan.DEVICES["gpu"])
    (b,) = [b for b in plan.make_blocks(a, "deca")][:1]
    s = plan.message_bytes(b, "bf16")
    peers = {q["peer"]: q for q in p["methods"]["deca"]["peers"]}
    assert peers[0]["comm_s"] == pytest.approx(0.080 + s * 8 / 50e6)  # its 0-1 link is the slowest
    assert peers[4]["comm_s"] == pytest.approx(0.020 + s * 8 / 100e6)
    assert p["methods"]["deca"]["network"]["step_s"] == pytest.approx(max(q["step_s"] for q in peers.values()))
    shared = plan.make_plan(a, _topo(latency_ms=20, bandwidth_mbps=100), plan.PlanInputs(codec="bf16", shared_uplink=True),
                            plan.DEVICES["gpu"])
    assert shared["methods"]["deca"]["peers"][4]["comm_s"] == pytest.approx(0.020 + 2 * s * 8 / 100e6)


@pytest.mark.parametrize("link", [{}, {"latency_ms": 50, "bandwidth_mbps": 1000}])
def test_peers_sharing_cores_share_the_step_s_cpu_then_exchange(link):
    a, topo = plan.load_arch("qwen2.5-0.5b"), _topo(**link)
    cpu = plan.DEVICES["cpu"]
    alone = plan.make_plan(a, topo, plan.PlanInputs(rounds=1, seq_len=128), cpu)["methods"]["deca"]["peers"][0]
    shared = plan.make_plan(a, topo, plan.PlanInputs(rounds=1, seq_len=128, peers_per_core=4),
                            cpu)["methods"]["deca"]["peers"][0]
    blocks = plan.make_blocks(a, "deca")
    # the kernel copies every byte sent and received once each way (2 neighbours: 2 messages out, 2 in)
    want = sum(2 * plan.TRANSPORT_BYTES * 2 * plan.message_bytes(b, "raw") for b in blocks) / len(blocks) / cpu.host_bw
    assert shared["transport_s"] == pytest.approx(want)
    # a core each: as before, the copies run beside the wire
    assert alone["step_s"] == pytest.approx(alone["compute_s"] + alone["comm_s"] + alone["local_s"])
    # shared (8 peers, 2 cores): the mean of every peer at once (4x the CPU, then the exchange) and the ideal pipeline
    cpu_s = shared["compute_s"] + shared["local_s"] + shared["transport_s"]
    at_once = 4 * cpu_s + shared["comm_s"]
    pipe = shared_cores_step(cpu_s, shared["comm_s"], {i: topo.neighbors(i) for i in topo.nodes}, 2)
    assert shared["step_s"] == pytest.approx((at_once + pipe) / 2)
    assert 4 * cpu_s - 1e-9 <= pipe <= at_once + 1e-9
    assert shared["step_overlap_s"] <= shared["step_s"] + 1e-12
    assert shared["step_overlap_s"] >= 4 * shared["compute_s"]
    with pytest.raises(plan.PlanError, match="peers-per-core"):
        plan.PlanInputs(peers_per_core=0.5).check()


def test_traffic_and_steps_add_up():
    a = plan.load_arch("llama-3.2-1b")
    inp = plan.PlanInputs(inner_steps=8, rounds=3, gossip_every=4)
    p = plan.make_plan(a, _topo(), inp, plan.DEVICES["gpu"])
    deca = p["methods"]["deca"]
    blocks = plan.make_blocks(a, "deca")
    assert deca["steps_per_round"] == len(blocks) * 8
    # 2 exchanges per activation (steps 4 and 8), 2 neighbours each
    assert deca["peers"][0]["sent_bytes_run"] == 3 * sum(2 * 2 * plan.message_bytes(b, "raw") for b in blocks)
    # and a process's first checkpoint, which writes more than the later ones (test_plan_checkpoint.py)
    first_extra = deca["network"]["run_s"] - 3 * deca["network"]["round_s"]
    assert 0 < first_extra < deca["network"]["round_s"]


def test_deca_computes_less_than_dadam():
    a = plan.load_arch("llama-3-8b")
    tokens, seq = 4096, 512
    (whole,) = plan.make_blocks(a, "dadam")
    full = plan.step_flops(a, "dadam", whole, tokens, seq)
    fwd = a.layers * plan.layer_forward_flops(a, tokens, seq) + plan.head_forward_flops(a, tokens)
    assert full == pytest.approx(3 * fwd)
    deca = [plan.step_flops(a, "deca", b, tokens, seq) for b in plan.make_blocks(a, "deca")]
    assert all(fwd < f < full for f in deca)
    assert sum(deca) / len(deca) == pytest.approx(1.5 * fwd, rel=0.1)  # forward + half the depth on average


# ------------------------------------------------------------------------------------------ memory

def test_memory_follows_the_code_s_bytes_per_parameter():
    """CPU, float32: model 4 B/parameter; 20 B per active parameter; the exchange 4 x degree (raw: the neighbours'
    blocks until the mix; θ½ goes out zero-copy), 8 + 4 x degree with a lossy codec (public copies); on a GPU the
    host also holds the copy of the block sent (4 B)."""
    a = plan.load_arch("qwen2.5-0.5b")
    blocks = plan.make_blocks(a, "deca")
    m0 = plan.memory(a, "deca", blocks, 0, 1, "float32", False, holds_previous_mix=False)
    m2 = plan.memory(a, "deca", blocks, 2, 1, "float32", False, holds_previous_mix=False)
    b = blocks[0].params
    assert m2.device_bytes - m0.device_bytes == pytest.approx(8 * b)  # 2 neighbours' blocks; θ½ itself is sent
    lossy = plan.memory(a, "deca", blocks, 2, 1, "float32", False, holds_previous_mix=False, codec="int8")
    assert lossy.device_bytes - m0.device_bytes == pytest.approx(16 * b)  # own copy, outgoing delta, 2 neighbours
    assert m0.parts["peak_phase"] == "mix"
    act = plan.activation_bytes(a, 1, a.layers, 4)  # layer.0 active: every layer's saved tensors (one token)
    big = blocks[0].largest
    chunk = 8 * min(big, plan.F64_CHUNK)  # one float64 chunk; the largest tensor's discrepancy in float32
    assert m0.device_bytes == pytest.approx(4 * plan.total_params(a) + 20 * b + 4 * big + chunk + act)
    peer = plan.memory(a, "deca", blocks, 0, 1, "float32", False)
    assert peer.device_bytes - m0.device_bytes == pytest.approx(4 * b)  # a peer holds the previous mix too
    bf = plan.memory(a, "deca", blocks, 2, 1, "bfloat16", True)
    # + fp32 master, and the discrepancy is float32 too; the exchange on the host
    assert bf.parts["phase_bytes"] == 28 * b + 4 * big + chunk
    assert bf.host_bytes == 12 * b  # the host copy sent, 2 neighbours' blocks
    assert bf.device_bytes == 2 * plan.total_params(a) + bf.parts["phase_bytes"]


def test_deca_memory_below_dadam_and_badam_scale():
    """Llama-3-8B, bf16 on a GPU: DECA ~ 2M + 16M/D (BAdam's 23.5 GB class) and far below decentralized Adam."""
    a = plan.load_arch("llama-3-8b")
    topo = _topo("complete", 2)
    p = plan.make_plan(a, topo, plan.PlanInputs(batch_size=1, seq_len=512), plan.DEVICES["gpu"])
    deca = p["methods"]["deca"]["network"]["max_memory_device_bytes"]
    dadam = p["methods"]["dadam"]["network"]["max_memory_device_bytes"]
    assert 16e9 < deca < 25e9
    assert dadam > 5 * deca


# ------------------------------------------------------------------------------------------ CLI

def _run(*args):
    return subprocess.run(deca_peer_cmd("plan", *args), capture_output=True, text=True, timeout=120)


def test_cli_json_and_table():
    p = _run("--model", "llama-3.2-1b", "--topology", RING8, "--rounds", "2", "--inner-steps", "4", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["model"]["params"] == 1_235_814_400
    assert set(out["methods"]) == {"deca", "dadam", "declora"}
    p = _run("--model", "qwen2.5-0.5b", "--topology", RING8, "--codec", "int8", "--flops", "1e13")
    assert p.returncode == 0, p.stderr
    assert "per peer" in p.stdout and "dadam" in p.stdout and "0-7" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (("--model", "gpt-17"), "unknown model"),
    (("--model", "/nonexistent/config.json"), "does not exist"),
    (("--model", "llama-3-8b", "--rounds", "abc"), "--rounds"),
    (("--model", "llama-3-8b", "--inner-steps", "0"), "--inner-steps"),
    (("--model", "llama-3-8b", "--flops", "-1"), "--flops"),
    (("--model", "llama-3-8b", "--flops", "nan"), "--flops"),
    (("--model", "llama-3-8b", "--codec", "zip"), "codec"),
    (("--model", "llama-3-8b", "--algo", "sgd"), "method"),
    (("--model", "llama-3-8b", "--device", "tpu"), "--device"),
    (("--model", "llama-3-8b", "--peers-per-core", "0.5"), "--peers-per-core"),
    (("--model", "llama-3-8b", "--peers-per-core", "many"), "--peers-per-core"),
    (("--model", "llama-3-8b", "--checkpoint-every", "0"), "--checkpoint-every"),
    (("--model", "llama-3-8b", "--disk-bw", "fast"), "--disk-bw"),
    (("--model", "llama-3-8b", "--disk-bw", "0"), "--disk-bw"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    p = _run(*args, "--topology", RING8)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_cli_bad_topology_and_config(tmp_path):
    p = _run("--model", "llama-3-8b", "--topology", tmp_path / "nope.json")
    assert p.returncode == 2 and "nope.json" in p.stderr
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 64}')
    p = _run("--model", bad, "--topology", RING8)
    assert p.returncode == 2 and "lacks" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    bad.write_text("{not json")
    p = _run("--model", bad, "--topology", RING8)
    assert p.returncode == 2 and "JSON" in p.stderr


def test_the_plans_float64_chunk_is_the_codes():
    from deca_p2p.optim import F64_CHUNK

    assert plan.F64_CHUNK == F64_CHUNK
