"""Robust mixing end to end: the in-process reference under attack, and real peers reproducing it bit for bit."""
import subprocess

import pytest

from conftest import REPO, deca_peer_cmd, free_base_port
from deca_p2p.checkpoint import latest, read_weights
from deca_p2p.config import make_config
from deca_p2p.metrics import records
from deca_p2p.simulate import simulate
from deca_p2p.topology import load as load_topology
from test_e2e import SMALL, _cli_args, _env


@pytest.mark.integration
def test_real_peers_with_robust_clip_under_attack_reproduce_simulate(deca_cache, tmp_path):
    """ring4, peer 1 publishing its block x1000, every peer clipping (and, from its 4th exchange, leaving 1 out):
    four real `deca-peer start` processes end with the in-process reference's weights."""
    cfg = {**SMALL, "robust": "clip", "attack": "x1000@1"}
    topo_path = REPO / "topologies" / "ring4.json"
    base = free_base_port(4)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(deca_peer_cmd("start", "--id", i, "--neighbors", topo_path, "--run-dir", run_dir,
                                            "--base-port", base, *_cli_args(cfg)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
             for i in range(4)]
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-2000:] for o in outs)
    assert "neighbour 1 flagged" in outs[0] and "neighbour 1 flagged" in outs[2]

    res = simulate(load_topology(topo_path), make_config(None, cfg))
    worst = 0.0
    for i in range(4):
        net = read_weights(latest(run_dir / f"peer-{i}" / "checkpoint"))
        ref = dict(res.models[i].named_parameters())
        for name, t in net.items():
            worst = max(worst, float((t.float() - ref[name].detach().float()).abs().max()))
    assert worst == 0.0, worst  # bit for bit: the same mixer, the same inputs, the same order
    for i in (0, 2):  # the attacker's neighbours flagged it, at the same exchange as in simulate
        final = records(run_dir, i, "final")[-1]
        assert final["flagged"] == res.flagged[i]["flagged"] and final["flagged_first"] == res.flagged[i]["flagged_first"]
        steps = records(run_dir, i, "step")
        assert all(1 in s["clipped"] or 1 in s["flagged"] for s in steps)
    assert not records(run_dir, 3, "final")[-1].get("flagged")  # peer 3 is not a neighbour of 1


def test_simulate_ring8_signflip_neighbour_with_and_without_defence(deca_cache):
    """One sign-flipping peer on ring8: without defence honest peers end far above the clean run; with the
    default defence (clip, automatic tau) they end where leaving the attacker out from the start puts them (the
    best a defence can do: its data is lost to them either way), and its two neighbours flag it, nobody else."""
    topo = load_topology(REPO / "topologies" / "ring8.json")
    base = {**SMALL, "inner_steps": 8, "eval_max_new_tokens": 1, "threads": 2}
    honest = [i for i in topo.nodes if i != 3]

    def run(**kw):
        res = simulate(topo, make_config(None, {**base, **kw}))
        return res, sum(res.per_peer[i]["eval_loss"] for i in honest) / len(honest)

    assert make_config(None, base).robust == "clip"  # the default
    _, clean = run()
    _, left_out = run(robust="none", robust_exclude="3")
    _, undefended = run(attack="signflip@3", robust="none")
    res, defended = run(attack="signflip@3")
    print(f"ring8 signflip@3: clean {clean:.4f}, left out {left_out:.4f}, none {undefended:.4f}, clip {defended:.4f}")
    assert undefended > clean * 1.2, (clean, left_out, undefended)
    assert defended < left_out * 1.05, (clean, left_out, defended, undefended)
    assert {i for i in honest if res.flagged[i]["flagged"]} == {2, 4}
    assert res.flagged[2]["flagged"].keys() == {"3"} and res.flagged[4]["flagged"].keys() == {"3"}
