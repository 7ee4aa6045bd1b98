"""`deca-peer plan`'s checkpoint cost (deca_p2p/plan_checkpoint.py): the bytes it says a save writes are the bytes a
real block-sharded save writes, the saves add up in the round and the run, and the disk calibration (and what
`plan --calibrate` measures beside it)."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deca_p2p import plan
from deca_p2p.blocks import partition
from deca_p2p.checkpoint import latest, save_atomic
from deca_p2p.plan_checkpoint import calibrate_disk, checkpoint_cost, save_bytes, saves_per_run
from deca_p2p.topology import generate


def _small_llama(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    cfg.save_pretrained(tmp_path / "arch")
    return model, plan.load_arch(str(tmp_path / "arch" / "config.json"))


def test_a_later_deca_save_writes_the_active_block_as_the_plan_says(tmp_path):
    model, arch = _small_llama(tmp_path)
    groups = [b.param_names for b in partition(model)]
    later, first = save_bytes(arch, "deca", plan.make_blocks(arch, "deca"), "float32")
    assert len(later) == len(groups)
    root = tmp_path / "ckpt"
    save_atomic(model, None, root, "first", groups=groups)
    weights = sum(f.stat().st_size for f in latest(root).glob("*.safetensors"))
    assert first == pytest.approx(2 * weights, rel=0.02)  # save_pretrained's file, then the shards
    for i, names in enumerate(groups):
        before = {f.name: f.stat().st_ino for f in latest(root).glob("*.safetensors")}
        save_atomic(model, None, root, f"a{i}", groups=groups, changed=names)
        now = {f.name: f for f in latest(root).glob("*.safetensors")}
        written = [f for name, f in now.items() if f.stat().st_ino != before.get(name)]  # the others are links
        assert len(written) == 1
        assert written[0].stat().st_size == pytest.approx(later[i], rel=0.02)  # + the safetensors header


def test_the_baselines_save_the_whole_model_every_time():
    a = plan.load_arch("qwen2.5-0.5b")
    model = 2 * plan.total_params(a)
    assert save_bytes(a, "dadam", plan.make_blocks(a, "dadam"), "bfloat16") == ([model], 2 * model)
    (lora,) = plan.make_blocks(a, "declora")
    assert save_bytes(a, "declora", [lora], "bfloat16") == ([model + 4 * lora.params], model + 4 * lora.params)


def test_saves_follow_checkpoint_every_over_the_run_and_every_round_end():
    # peer.py: after activation a (counted over the run) when (a + 1) % every == 0, and after each round's last
    assert saves_per_run("deca", 8, 3, 1) == 24
    assert saves_per_run("deca", 8, 3, 3) == 10  # a + 1 in 3, 6, 8, 9, 12, 15, 16, 18, 21, 24
    assert saves_per_run("deca", 8, 3, 100) == 3
    assert saves_per_run("dadam", 8, 3, 3) == 24  # its rounds are one activation long: a save after each


def test_deca_writes_every_block_once_a_round_whatever_checkpoint_every():
    """A save rewrites the shards of every block trained since the last one (peer.py's `changed`): fewer saves
    save the fixed part, not the bytes."""
    a = plan.load_arch("llama-3-8b")
    blocks = plan.make_blocks(a, "deca")
    later, first = save_bytes(a, "deca", blocks, "bfloat16")
    each = checkpoint_cost("deca", later, first, len(blocks), 3, 1, 1e9, 0.005)
    rare = checkpoint_cost("deca", later, first, len(blocks), 3, 1000, 1e9, 0.005)
    assert each["bytes_per_round"] == rare["bytes_per_round"] == pytest.approx(sum(later))
    assert (each["saves_per_round"], rare["saves_per_round"]) == (len(blocks), 1)
    assert each["seconds_per_round"] - rare["seconds_per_round"] == pytest.approx((len(blocks) - 1) * 0.005)
    assert rare["bytes_per_save"] == pytest.approx(sum(later))


def test_checkpoints_add_to_the_round_and_the_first_one_to_the_run():
    a = plan.load_arch("llama-3-8b")
    topo = generate("ring", 4)
    dev = plan.DEVICES["gpu"]
    inp = plan.PlanInputs(rounds=3)
    p = plan.make_plan(a, topo, inp, dev)
    slow = plan.make_plan(a, topo, inp, dataclasses.replace(dev, disk_bw=dev.disk_bw / 10))
    n_blocks = len(plan.make_blocks(a, "deca"))
    for m in plan.METHODS:
        fast_peer, slow_peer = p["methods"][m]["peers"][0], slow["methods"][m]["peers"][0]
        assert fast_peer["checkpoints_per_round"] == n_blocks
        assert slow_peer["checkpoint_s"] > 9 * (fast_peer["checkpoint_s"] - dev.save_s)
        assert slow_peer["round_s"] - fast_peer["round_s"] == pytest.approx(
            n_blocks * (slow_peer["checkpoint_s"] - fast_peer["checkpoint_s"]))
        extra = fast_peer["run_s"] - 3 * fast_peer["round_s"]  # the first save writes the model twice (declora: once)
        assert extra == pytest.approx(max(0.0, fast_peer["first_checkpoint_bytes"] - fast_peer["checkpoint_bytes"])
                                      / dev.disk_bw)
    deca, dadam = (p["methods"][m]["peers"][0]["checkpoint_s"] for m in ("deca", "dadam"))
    assert dadam > 20 * deca  # the whole model against one of 32 layers
    # peers sharing a host's cores share its disk, and save at about the same time
    shared = plan.make_plan(a, topo, dataclasses.replace(inp, peers_per_core=2), dev)
    own = p["methods"]["deca"]["peers"][0]
    assert shared["methods"]["deca"]["peers"][0]["checkpoint_s"] == pytest.approx(
        dev.save_s + 4 * (own["checkpoint_s"] - dev.save_s))


def test_calibrate_disk_times_real_saves_and_leaves_nothing(tmp_path):
    bw, fixed = calibrate_disk(tmp_path, reps=1)
    assert bw > 1e6 and 0 < fixed < 5
    assert list(tmp_path.iterdir()) == []


def test_calibrate_disk_where_it_cannot_write_is_a_plan_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    for where in (tmp_path / "a-file", tmp_path / "missing"):
        with pytest.raises(plan.PlanError, match="--disk-bw"):
            calibrate_disk(where)


def test_cli_calibrate_with_a_given_disk_rate_writes_nothing(tmp_path):
    import json
    import subprocess

    from conftest import REPO, deca_peer_cmd

    p = subprocess.run(deca_peer_cmd("plan", "--model", "qwen2.5-0.5b", "--topology", REPO / "topologies" / "ring8.json",
                                     "--calibrate", "--disk-bw", "2e9", "--json"),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["device"]["disk_bw"] == 2e9
    assert list(tmp_path.iterdir()) == []


def test_declora_checkpoint_holds_a_second_model_in_the_plan_as_in_the_code(deca_cache):
    """Every Dec-LoRA save exports lora.merged(model): a deep copy of the whole model. The plan counts it as a phase
    of its own, the peak on a GPU for Llama-3-8B (a copy of 16 GB beside the model)."""
    import copy

    from deca_p2p import lora
    from deca_p2p.config import make_config
    from deca_p2p.runtime import load

    cfg = make_config(None, {"algo": "declora", "seed": 1})
    model = lora.wrap(copy.deepcopy(load(make_config(None, {})).model), cfg)
    merged = lora.merged(model)
    ptrs = {p.data_ptr() for p in model.parameters()}
    copied = sum(p.numel() * p.element_size() for p in merged.parameters() if p.data_ptr() not in ptrs)
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in set(lora.adapter_names(model)))
    assert copied >= base  # nothing of the model is shared: the save holds a second one

    a = plan.load_arch("llama-3-8b")
    (block,) = plan.make_blocks(a, "declora")
    m = plan.memory(a, "declora", [block], 2, 512, "bfloat16", True)
    assert m.parts["peak_phase"] == "checkpoint"
    assert m.device_bytes >= 2 * 2 * plan.total_params(a)  # the model and its merged copy, bf16


def test_calibrate_keeps_the_validated_host_rate():
    dev = plan.calibrate("cpu", seconds=0.4, disk_dir=None)
    assert dev.host_bw == plan.DEVICES["cpu"].host_bw  # the rate plan_validation checks the exchange's passes with
    assert (dev.disk_bw, dev.save_s) == (plan.DISK_BW, plan.SAVE_S)
    assert 1e8 < dev.mem_bw < 1e12 and dev.flops > 1e8
