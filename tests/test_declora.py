"""Decentralized LoRA (`--algo declora`): peft adapters on every peer, gossiped; the base stays frozen; checkpoints
are merged plain HF models with the adapters beside them for a bit-exact restart."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p import lora
from deca_p2p.checkpoint import CheckpointError, latest
from deca_p2p.config import ConfigError, make_config
from deca_p2p.simulate import simulate
from deca_p2p.topology import load as load_topology

RING4 = REPO / "topologies" / "ring4.json"
SMALL = {"rounds": 2, "inner_steps": 3, "batch_size": 8, "train_per_task": 100, "eval_per_task": 4,
         "threads": 1, "seed": 1, "algo": "declora", "lr": 3e-3}


def _base_name(peft_name: str) -> str:
    """A wrapped model's parameter name -> the plain model's (peft: base_model.model.<name>, .base_layer.)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _adapters(model) -> dict[str, torch.Tensor]:
    names = set(lora.adapter_names(model))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def _plain_model():
    """The embedded default model, unwrapped, as every peer loads it."""
    from deca_p2p.runtime import load

    return load(make_config(None, SMALL)).model


@pytest.fixture(scope="module")
def declora_run(deca_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("declora-sim")
    res = simulate(load_topology(RING4), make_config(None, SMALL), run_dir=run_dir, save=True)
    return res, run_dir


def test_same_adapter_init_on_every_peer_whatever_the_rng(deca_cache):
    cfg = make_config(None, {"algo": "declora", "seed": 5})
    base = _plain_model()
    torch.manual_seed(123)
    a = lora.wrap(copy.deepcopy(base), cfg)
    torch.rand(1000)  # a peer that used its RNG differently before wrapping
    state = torch.random.get_rng_state()
    b = lora.wrap(copy.deepcopy(base), cfg)
    assert torch.equal(torch.random.get_rng_state(), state), "wrapping leaves the caller's RNG alone"
    ad_a, ad_b = _adapters(a), _adapters(b)
    linear = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not base.get_output_embeddings()]
    assert len(ad_a) == 2 * len(linear)  # all-linear: every linear layer but the head, an A and a B each
    assert all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    assert any("lora_A" in k and ad_a[k].abs().sum() > 0 for k in ad_a)
    other = _adapters(lora.wrap(copy.deepcopy(base), make_config(None, {"algo": "declora", "seed": 6})))
    assert any(not torch.equal(ad_a[k], other[k]) for k in ad_a if "lora_A" in k)
    # rank and targets are configurable; a bad target is one ConfigError line
    small = lora.wrap(copy.deepcopy(base), make_config(None, {"algo": "declora", "lora_rank": 2,
                                                               "lora_targets": "q_proj, v_proj"}))
    names = lora.adapter_names(small)
    assert len(names) == 2 * 2 * base.config.num_hidden_layers
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    assert all(2 in p.shape for n, p in small.named_parameters() if n in names)
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.wrap(copy.deepcopy(base), make_config(None, {"algo": "declora", "lora_targets": "no_such_proj"}))
    with pytest.raises(ConfigError, match="lora_rank"):
        make_config(None, {"algo": "declora", "lora_rank": 0})


def test_declora_simulate_trains_the_adapters_and_not_the_base(declora_run):
    res, _ = declora_run
    base = _plain_model()
    plain = dict(base.named_parameters())
    init = _adapters(lora.wrap(copy.deepcopy(base), make_config(None, SMALL)))
    for i, model in res.models.items():
        names = set(lora.adapter_names(model))
        for n, p in model.named_parameters():
            if n in names:
                continue
            assert torch.equal(p, plain[_base_name(n)]), f"peer {i}: base weight {n} changed"
        now = _adapters(model)
        assert set(now) == set(init)
        assert all(not torch.equal(now[k], init[k]) for k in now if "lora_B" in k), f"peer {i}: adapters did not train"
    # non-IID peers end with different adapters, and training lowered the loss on average
    a, b = _adapters(res.models[0]), _adapters(res.models[2])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    mean = sum(r["eval_loss"] for r in res.per_peer.values()) / len(res.per_peer)
    assert mean < res.initial["eval_loss"], (res.initial, res.per_peer)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_merged_checkpoint_loads_without_peft_and_gives_the_peft_logits(declora_run, tmp_path):
    res, run_dir = declora_run
    ckpt = latest(run_dir / "peer-1" / "checkpoint")
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (ckpt / "adapter_config.json").exists(), "transformers would stack the adapters on the merged model"
    merged = lora.merged(res.models[1])
    saved = load_file(ckpt / "model.safetensors")
    ref = dict(merged.named_parameters())
    assert set(saved) <= set(ref) and not any("lora" in k for k in saved)
    assert all(torch.equal(saved[k], ref[k]) for k in saved)

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    out = tmp_path / "logits.pt"
    script = (
        "import sys; sys.modules['peft'] = None\n"  # `import peft` fails from here on
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, local_files_only=True).eval()\n"
        "assert not any('lora' in n for n, _ in m.named_parameters())\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids).logits, {str(out)!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    model = res.models[1]
    was = model.training
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.train(was)
    got = torch.load(out)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    # and the adapter folder is a peft adapter in its own right
    from peft import PeftModel

    base = _plain_model()
    again = PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)


def test_average_of_merged_checkpoints(declora_run, tmp_path):
    from deca_p2p.average import average_run

    res, run_dir = declora_run
    out = average_run(run_dir, tmp_path / "avg")
    avg = load_file(out / "model.safetensors")
    merged = [dict(lora.merged(m).named_parameters()) for m in res.models.values()]
    for k, t in avg.items():
        mean = torch.stack([m[k].detach().double() for m in merged]).mean(0)
        assert (t.double() - mean).abs().max() <= 1e-6, k


def test_resume_restores_the_adapters_bit_for_bit(deca_cache, tmp_path):
    from deca_p2p.metrics import MetricsLog
    from deca_p2p.peer import _checkpoint, _resume
    from deca_p2p.runtime import embedded_data, load, make_batcher, PeerData
    from deca_p2p.trainer import PeerTrainer

    cfg = make_config(None, SMALL)
    lm = load(cfg)
    shards, evals = embedded_data(cfg, [0, 1])
    data = PeerData(shards[0], evals, "shard", "eval")

    def fresh():
        return PeerTrainer(copy.deepcopy(lm.model), make_batcher(cfg, lm, 0, data), cfg)

    t = fresh()
    t.activate(0)
    for step in range(3):
        t.local_step(step)
        t.apply_mix([x.clone() for x in t.block().values()])
    root = tmp_path / "checkpoint"
    _checkpoint(t, lm.tokenizer, root, 0, 0, 0)
    ckpt = latest(root)
    assert json.loads((ckpt / "deca_state.json").read_text())["activation"] == 0

    u = fresh()
    assert any(not torch.equal(a, b) for a, b in zip(_adapters(u.model).values(), _adapters(t.model).values()))
    log = MetricsLog(tmp_path / "run", 0)
    assert _resume(u, root, log) == 1
    log.close()
    mine, theirs = dict(t.model.named_parameters()), dict(u.model.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "every parameter, adapters included, restored exactly"
    assert torch.equal(t.batcher.state_dict()["generator"], u.batcher.state_dict()["generator"])

    # a checkpoint without adapters (not written by declora) is refused in one line
    (ckpt / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter"):
        fresh().restore(ckpt)


@pytest.mark.integration
def test_real_peers_reproduce_the_simulated_declora_network(deca_cache, tmp_path):
    from test_e2e import _env

    cfg = {**SMALL, "seed": 3}
    flags = ("rounds", "inner_steps", "batch_size", "threads", "seed", "lr", "algo")
    args = [a for k, v in cfg.items() for a in ((f"--{k.replace('_', '-')}", str(v)) if k in flags
                                                 else ("--set", f"{k}={v}"))]
    base = free_base_port(4)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", RING4, "--run-dir", run_dir,
                                            "--base-port", base, *args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
             for i in range(4)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append(out.decode(errors="replace"))
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outs)

    res = simulate(load_topology(RING4), make_config(None, cfg))
    worst = 0.0
    nets = {}
    for i in range(4):
        ckpt = latest(run_dir / f"peer-{i}" / "checkpoint")
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
        nets[i] = load_file(ckpt / "model.safetensors")
        ref = dict(lora.merged(res.models[i]).named_parameters())
        assert set(nets[i]) <= set(ref)
        for name, t in nets[i].items():
            worst = max(worst, float((t.float() - ref[name].detach().float()).abs().max()))
    assert worst <= 1e-6, worst
    assert any(not torch.equal(nets[0][k], nets[2][k]) for k in nets[0]), "the peers trained"
