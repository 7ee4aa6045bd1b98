"""Differential privacy of the shared blocks (deca_p2p/privacy.py): the clip + noise maths, the accountant, the
trainer's release steps, the reported ε, the flags' errors, and (integration) real peers reproducing `simulate`."""
import json
import math
import os
import random
import subprocess

import pytest
import torch

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p import privacy
from deca_p2p.config import ConfigError, make_config
from deca_p2p.simulate import simulate
from deca_p2p.topology import load as load_topology

RING4 = REPO / "topologies" / "ring4.json"
TINY = {"rounds": 1, "inner_steps": 2, "batch_size": 8, "train_per_task": 60, "eval_per_task": 2, "threads": 1,
        "seed": 2, "eval_max_new_tokens": 8}


# ------------------------------------------------------------------------------------------------ the mechanism

def _block(seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    half = [r + 0.5 * torch.randn(r.shape, generator=g) for r in ref]
    return ref, half


def test_clip_and_noise_matches_a_hand_computation():
    ref, half = _block()
    delta = [h - r for h, r in zip(half, ref)]
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
    clip, sigma = norm / 3, 0.7
    z = torch.Generator().manual_seed(11)
    noise = [torch.randn(r.shape, generator=z) for r in ref]  # the same draws, in parameter order
    want = [r + d * (clip / norm) + sigma * clip * n for r, d, n in zip(ref, delta, noise)]
    got = [h.clone() for h in half]
    n, clipped = privacy.clip_and_noise(got, ref, clip, sigma, torch.Generator().manual_seed(11))
    assert clipped and n == pytest.approx(norm, rel=1e-12)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    # the clipped change has norm C before the noise
    got = [h.clone() for h in half]
    privacy.clip_and_noise(got, ref, clip, 0.0, torch.Generator())
    assert math.sqrt(sum(float((a - r).double().pow(2).sum()) for a, r in zip(got, ref))) == pytest.approx(clip, rel=1e-5)


def test_a_change_inside_the_radius_gets_only_the_noise():
    ref, half = _block(1)
    got = [h.clone() for h in half]
    _, clipped = privacy.clip_and_noise(got, ref, 1e9, 0.5, torch.Generator().manual_seed(3))
    z = torch.Generator().manual_seed(3)
    assert not clipped
    for a, h in zip(got, half):
        assert torch.equal(a, h.clone().add_(torch.randn(h.shape, generator=z), alpha=0.5 * 1e9))


def test_no_noise_and_an_unreached_radius_change_nothing_bit_for_bit():
    ref, half = _block(2)
    got = [h.clone() for h in half]
    privacy.clip_and_noise(got, ref, 1e30, 0.0, torch.Generator())
    assert all(torch.equal(a, h) for a, h in zip(got, half))


def test_generator_seeds_are_per_peer_and_secret_by_default():
    assert privacy.generator_seed(5, 0) == privacy.generator_seed(5, 0) != privacy.generator_seed(5, 1)
    assert privacy.generator_seed(None, 0) != privacy.generator_seed(None, 0)  # OS randomness (2^-63 to collide)


def test_public_stats_drop_everything_that_depends_on_the_data():
    st = {"loss": 2.3, "grad_norm": 1.0, "lr": 1e-3, "compute_s": 0.1, "dp_change_norm": 0.4, "dp_epsilon": 3.0,
          "dp_releases": 7}
    assert privacy.public_stats(st) == {"lr": 1e-3, "dp_epsilon": 3.0, "dp_releases": 7}


# ------------------------------------------------------------------------------------------------ the accountant

def test_epsilon_grows_with_releases_and_shrinks_with_noise():
    d = 1e-5
    assert privacy.epsilon(1.0, 0, d) == 0.0
    assert privacy.epsilon(0.0, 3, d) == math.inf  # clipping alone is no privacy
    by_n = [privacy.epsilon(2.0, n, d) for n in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(by_n, by_n[1:])) and all(math.isfinite(e) for e in by_n)
    by_sigma = [privacy.epsilon(s, 100, d) for s in (0.5, 1, 4, 16, 64)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert privacy.epsilon(2.0, 100, 1e-3) < privacy.epsilon(2.0, 100, 1e-7)  # a looser δ costs less ε


def test_accountant_charges_sensitivity_two_c():
    """σ here is noise std / C; one release is a Gaussian mechanism of multiplier σ/2 (changing one example moves
    the clipped change by up to 2C): the same ε as dp-accounting's for GaussianDpEvent(σ/2)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 40))
    assert privacy.epsilon(6.0, 40, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("target,n", [(1.0, 10), (8.0, 64), (1.0, 768), (8.0, 768)])
def test_noise_for_epsilon_inverts_the_accountant(target, n):
    sigma = privacy.noise_for_epsilon(target, n, 1e-5)
    assert privacy.epsilon(sigma, n, 1e-5) <= target  # on the private side ...
    assert privacy.epsilon(sigma * 0.999, n, 1e-5) > target * 0.999  # ... and no noisier than needed
    assert privacy.epsilon(sigma, n, 1e-5) == pytest.approx(target, rel=1e-3)


# ------------------------------------------------------------------------------------------------ config and CLI

def test_config_checks_the_dp_settings():
    with pytest.raises(ConfigError, match="dp_noise must be a finite number >= 0"):
        make_config(None, {"dp_noise": -1, "dp_clip": 1})
    with pytest.raises(ConfigError, match="dp_clip must be"):
        make_config(None, {"dp_clip": float("nan")})
    with pytest.raises(ConfigError, match="dp_noise needs dp_clip"):
        make_config(None, {"dp_noise": 1.0})
    with pytest.raises(ConfigError, match="dp_delta must be in"):
        make_config(None, {"dp_noise": 1.0, "dp_clip": 1.0, "dp_delta": 1.0})
    with pytest.raises(ConfigError, match="dp_seed"):
        make_config(None, {"dp_seed": "abc"})
    assert make_config(None, {"dp_seed": "7"}).dp_seed == 7 and make_config(None, {"dp_seed": "none"}).dp_seed is None
    assert make_config(None, {"dp_clip": 0.5}).dp_noise == 0.0  # clipping alone is allowed (ε = ∞)


@pytest.mark.parametrize("args,needle", [
    (["--dp-noise", "-1", "--dp-clip", "1"], "dp_noise"),
    (["--dp-clip", "-0.5"], "dp_clip"),
    (["--dp-noise", "1"], "dp_clip"),
    (["--dp-noise", "1", "--dp-clip", "1", "--dp-delta", "0"], "dp_delta"),
    (["--set", "dp_seed=x"], "dp_seed"),
])
def test_bad_dp_flags_exit_2_with_one_line(tmp_path, args, needle):
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", RING4, *args), capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


# ------------------------------------------------------------------------------------------------ in training

def _trainer(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    from deca_p2p.tasks import make_task_examples
    from deca_p2p.encoding import Batcher
    from deca_p2p.models import DEFAULT_MODEL_CONFIG, _build_tokenizer
    from deca_p2p.trainer import PeerTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**DEFAULT_MODEL_CONFIG, "hidden_size": 32, "intermediate_size": 64,
                                            "num_hidden_layers": 2}))
    cfg = make_config(None, {"batch_size": 4, "rounds": 1, "inner_steps": 4, "lr": 1e-2, **over})
    t = PeerTrainer(model, Batcher(make_task_examples("rev", 16, random.Random(0)), _build_tokenizer(), 4, 0, 32), cfg)
    t.activate(1)
    return t


def _dist(a, b):
    return math.sqrt(sum(float((x.detach() - y.detach()).double().pow(2).sum()) for x, y in zip(a, b)))


def test_releases_are_the_exchange_steps_and_clip_the_change_since_the_last_one():
    """gossip_every 2 over R = 4: steps 1 and 3 release; step 0's local change is not clipped on its own but
    counted into step 1's, which is measured from the block at activation; step 3's from step 1's mixed value."""
    c = 1e-3
    t = _trainer(gossip_every=2, dp_clip=c)
    start = [p.detach().clone() for p in t.active.params]
    st = t.local_step(0)
    assert "dp_change_norm" not in st and st["dp_releases"] == 0 and st["dp_epsilon"] == 0.0
    assert _dist(t.active.params, start) > c  # a local step moves the block further than C ...
    t.apply_mix([p.clone() for p in t.active.params])  # a local-only step: the reference stays
    st = t.local_step(1)
    assert st["dp_releases"] == 1 and st["dp_clipped"] == 1.0 and st["dp_epsilon"] == math.inf
    assert _dist(t.active.params, start) == pytest.approx(c, rel=1e-4)  # ... but the release is C from the start
    mixed = [p.detach() + 0.01 for p in t.active.params]  # the mix moves it (neighbours' blocks)
    t.apply_mix([m.clone() for m in mixed])  # (the mix hands its tensors over to the parameters)
    t.local_step(2)
    t.apply_mix([p.clone() for p in t.active.params])
    st = t.local_step(3)
    assert st["dp_releases"] == 2
    assert _dist(t.active.params, mixed) == pytest.approx(c, rel=1e-4)  # measured from the last mixed value


def test_moments_see_the_true_gradient_only_the_parameter_is_noised():
    plain, dp = _trainer(), _trainer(dp_clip=1e-3, dp_noise=5.0, dp_seed=0)
    a, b = plain.local_step(0), dp.local_step(0)
    assert a["loss"] == b["loss"]
    assert all(torch.equal(m1, m2) for m1, m2 in zip(plain.opt.m, dp.opt.m))
    assert all(torch.equal(v1, v2) for v1, v2 in zip(plain.opt.v, dp.opt.v))
    assert not all(torch.equal(p, q) for p, q in zip(plain.active.params, dp.active.params))


def test_no_noise_and_an_unreached_radius_train_exactly_as_without_dp(deca_cache):
    topo = load_topology(RING4)
    plain = simulate(topo, make_config(None, TINY))
    huge = simulate(topo, make_config(None, {**TINY, "dp_clip": 1e30}))
    for i in plain.models:
        for (n, p), (_, q) in zip(plain.models[i].named_parameters(), huge.models[i].named_parameters()):
            assert torch.equal(p, q), n
    assert all(r["dp_epsilon"] == math.inf for r in huge.privacy.values())


def test_simulate_with_dp_reports_a_finite_epsilon_in_metrics_and_table(deca_cache, tmp_path):
    from deca_p2p.metrics import read_metrics
    from deca_p2p.report import run_table

    run = tmp_path / "run"
    p = subprocess.run(deca_peer_cmd("simulate", "--topology", RING4, "--run-dir", run, "--rounds", "1",
                                     "--inner-steps", "2", "--batch-size", "8", "--threads", "1", "--seed", "2",
                                     "--set", "train_per_task=60", "--set", "eval_per_task=2",
                                     "--set", "eval_max_new_tokens=8", "--dp-noise", "4", "--dp-clip", "0.05",
                                     "--set", "dp_seed=1"),
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "COLUMNS": "250"})  # the whole table on one line per peer
    assert p.returncode == 0, p.stderr[-3000:]
    n_blocks = 4  # the embedded base's decoder layers; embeddings and head frozen
    releases = 1 * n_blocks * 2
    want = privacy.epsilon(4.0, releases, 1e-5)
    assert math.isfinite(want) and f"{want:.3g}" in p.stdout and "ε" in p.stdout
    for pid, recs in read_metrics(run).items():
        steps = [r for r in recs if r["event"] == "step"]
        eps = [r["dp_epsilon"] for r in steps]
        assert all(math.isfinite(e) for e in eps) and eps == sorted(eps) and eps[-1] == pytest.approx(want)
        assert all(r["dp_change_norm"] > 0 for r in steps)
        final = [r for r in recs if r["event"] == "final"][-1]
        assert final["dp_releases"] == releases and final["dp_epsilon"] == pytest.approx(want)
        assert final["dp_delta"] == 1e-5
    table = run_table(run)
    assert "ε" in [c.header for c in table.columns]
    assert json.loads((run / "config.json").read_text())["dp_noise"] == 4.0


def test_a_restarted_peer_counts_on_from_its_logged_releases(tmp_path):
    from deca_p2p.metrics import MetricsLog
    from deca_p2p.peer import _released_before

    log = MetricsLog(tmp_path, 2)
    for n in (0, 1, 1, 2, 3):
        log.write("step", dp_releases=n, dp_epsilon=1.0)
    log.close()
    assert _released_before(str(tmp_path), 2) == 4  # 3 logged, and one it may have sent without logging it
    assert _released_before(str(tmp_path), 5) == 1  # nothing logged: still one, to be safe


# ------------------------------------------------------------------------------------------------ real peers

@pytest.mark.integration
def test_real_peers_with_dp_reproduce_simulate(deca_cache, tmp_path):
    """The noise is drawn where the real peer and the in-process reference draw it, from the same per-peer
    generator (dp_seed set): the networked weights equal the reference's."""

    from deca_p2p.checkpoint import latest, read_weights

    # the default robust clip: its cold radius has a floor at the noise's scale (robust.py); without it this noise
    # left the honest neighbours out (two exchanges per activation here) and the peers trained alone
    cfg = {**TINY, "codec": "raw", "dp_noise": 2.0, "dp_clip": 0.05, "dp_seed": 4}
    base = free_base_port(4)
    run = tmp_path / "run"
    flags = []
    for k, v in cfg.items():
        flags += ["--set", f"{k}={v}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", RING4, "--run-dir", run,
                                            "--base-port", base, *flags),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
             for i in range(4)]
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outs)
    res = simulate(load_topology(RING4), make_config(None, cfg))
    for i in range(4):
        net = read_weights(latest(run / f"peer-{i}" / "checkpoint"))
        ref = dict(res.models[i].named_parameters())
        for name, t in net.items():
            assert torch.equal(t, ref[name].detach()), (i, name)
        recs = [json.loads(line) for line in (run / f"peer-{i}" / "metrics.jsonl").read_text().splitlines()]
        final = recs[-1]
        assert final["event"] == "final" and final["dp_epsilon"] == pytest.approx(res.privacy[i]["dp_epsilon"])
        mixes = [r["mixed"] for r in recs if r["event"] == "step" and "mixed" in r]
        assert mixes and all(sorted(m) == sorted({(i - 1) % 4, (i + 1) % 4}) for m in mixes), (i, mixes)


# A peer that writes down the stats keys of every block it takes from a neighbour (what crossed the wire beside the
# block). Run as `python -c SPY OUTFILE start ...`.
SPY = """
import sys
from deca_p2p import gossip
out = sys.argv.pop(1)
orig = gossip.Gossip._take
seen = set()
def spy(self, j, msg, seq, arrived):
    if msg.kind == "block" and not set(msg.stats) <= seen:
        seen.update(msg.stats)
        with open(out, "w") as f:
            f.write(" ".join(sorted(seen)))
    return orig(self, j, msg, seq, arrived)
gossip.Gossip._take = spy
from deca_p2p.cli import main
main()
"""


@pytest.mark.integration
@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no_dp"])
def test_with_dp_a_block_carries_no_data_dependent_number(deca_cache, tmp_path, dp):
    """peer.py hands gossip only `public_stats` with DP on; without DP the loss and gradient norm go along (the
    control: what the spy sees is what was sent)."""
    from deca_p2p.topology import ring

    topo = tmp_path / "ring2.json"
    topo.write_text(ring(2).to_json())
    flags = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    if dp:
        flags += ["--dp-clip", "0.05", "--dp-noise", "0.5"]
    base = free_base_port(2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = [tmp_path / f"seen-{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([deca_peer_cmd()[0], "-c", SPY, str(seen[i]), "start", "--id", str(i), "--neighbors",
                               str(topo), "--run-dir", str(tmp_path / "run"), "--base-port", str(base), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    for f in seen:
        keys = set(f.read_text().split())
        if dp:
            assert keys and keys <= {*privacy.PUBLIC_STATS, "sent_at"}, keys  # sent_at: the link's timing
        else:
            assert {"loss", "grad_norm"} <= keys, keys
