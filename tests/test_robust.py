"""Robust mixing (robust.py) and the attack hook (attacks.py): pure maths, fast."""
import math

import numpy as np

import pytest
import torch

from deca_p2p import robust
from deca_p2p.attacks import Attack, make_attack, parse
from deca_p2p.config import ConfigError, make_config
from deca_p2p.robust import COLD_TAU, FLAG_MIN, FLAG_WINDOW, SPEED, TAU_FACTOR, TAU_WARM, RobustMixer


def _block(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 7, generator=g) * scale, torch.randn(5, generator=g) * scale]


def _near(own, seed, eps):
    g = torch.Generator().manual_seed(seed)
    return [o + eps * torch.randn(o.shape, generator=g) for o in own]


def _norm(ts):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def _sub(a, b):
    return [x.double() - y.double() for x, y in zip(a, b)]


RING = {0: 1 / 3, 1: 1 / 3, 7: 1 / 3}          # peer 0 of a ring: neighbours 1 and 7
EXP = {0: 0.2, 1: 0.2, 2: 0.2, 4: 0.2, 8: 0.2}  # peer 0 of exp16 (degree 4)


def test_plain_mode_is_the_mix_accumulator_bit_for_bit():
    from deca_p2p.optim import MixAccumulator, self_weight

    own = _block(0)
    theirs = {7: _near(own, 1, 0.1), 1: _near(own, 2, 0.1)}
    acc = MixAccumulator(own)
    for j in (1, 7):
        acc.add(theirs[j], RING[j])
    acc.add(own, self_weight(RING, 0, [1, 7]))
    out = RobustMixer(0, RING, "none").mix(own, theirs)
    assert all(torch.equal(a, b) for a, b in zip(out, acc.result()))


def test_clip_with_tau_above_every_distance_is_the_plain_mix_bit_for_bit():
    own = _block(0)
    theirs = {j: _near(own, j, 0.05 * (1 + 0.1 * (j % 3))) for j in EXP if j != 0}
    plain = RobustMixer(0, EXP, "none").mix(own, theirs)
    for tau in (0.0, 10.0):  # automatic (honest neighbours within 20% of each other), and a generous explicit one
        m = RobustMixer(0, EXP, "clip", tau=tau)
        out = m.mix(own, theirs)
        assert m.last.clipped == {}
        assert all(torch.equal(a, b) for a, b in zip(out, plain))


def _clip(z, tau):
    n = _norm(z)
    return [x * min(1.0, tau / n) if n else x for x in z]


@pytest.mark.parametrize("tau", [0.0, 0.01])
def test_clip_bounds_each_neighbours_influence_by_its_weight_times_tau(tau):
    own = _block(0)
    honest = _near(own, 1, 0.02)
    for bad in ([x * 1000 for x in own], [-x for x in own], _block(99, 50.0), _near(own, 5, 0.03), own):
        m = RobustMixer(0, RING, "clip", tau=tau)
        out = m.mix(own, {1: honest, 7: bad})
        t = m.last.tau
        if tau:
            assert t == pytest.approx(tau * _norm(own))
        # θ½ + w_1 CLIP(θ̂_1 − θ½, τ): everything but the attacker's term; what is left is at most w_7 τ
        rest = [o.double() + RING[1] * c for o, c in zip(own, _clip(_sub(honest, own), t))]
        assert _norm(_sub(out, rest)) <= RING[7] * t * (1 + 1e-6) + 1e-6
    # and the whole move away from θ½ is at most Σ_j w_ij τ
    m = RobustMixer(0, RING, "clip", tau=tau)
    out = m.mix(own, {1: [x * 1000 for x in own], 7: [-x for x in own]})
    assert _norm(_sub(out, own)) <= (RING[1] + RING[7]) * m.last.tau * (1 + 1e-6) + 1e-6


def test_automatic_tau_is_not_driven_up_by_one_attacker():
    own = _block(0)
    for row, attacker in ((RING, 7), (EXP, 8)):
        m = RobustMixer(0, row, "clip")
        honest_max = 0.0
        for step in range(30):
            theirs = {j: _near(own, 100 * step + j, 0.01 * (1 + 0.2 * math.sin(step + j))) for j in row if j != 0}
            honest_max = max(honest_max, *(_norm(_sub(t, own)) for j, t in theirs.items() if j != attacker))
            theirs[attacker] = [x * 1000 for x in own]
            out = m.mix(own, theirs)
            if step < TAU_WARM - 1:  # warm-up: a share of the peer's own norm, whatever the neighbours send
                assert m.last.tau == pytest.approx(COLD_TAU * _norm(own))
            else:
                assert m.last.tau <= TAU_FACTOR * honest_max * (1 + 1e-9)
            assert attacker in m.last.clipped or attacker in m.last.flagged  # clipped, then left out once flagged
            assert (attacker in m.last.flagged) == (step >= FLAG_MIN - 1)
            assert all(j not in m.last.clipped for j in theirs if j != attacker) or row is RING
            assert _norm(_sub(out, own)) <= 2 * TAU_FACTOR * honest_max  # the x1000 block's norm is ~1e4


def test_automatic_tau_restarts_with_each_activation():
    own = _block(0)
    m = RobustMixer(0, RING, "clip")
    for s in range(4):
        m.mix(own, {1: _near(own, s, 1.0), 7: _near(own, s + 50, 1.0)})
    m.begin_activation()  # a new block, of a much smaller scale
    small = [x * 1e-3 for x in own]
    m.mix(small, {1: _near(small, 1, 1e-3), 7: _near(small, 2, 1e-3)})
    assert m.last.tau < 0.1


def test_trim_drops_a_single_outlier_coordinate_wise():
    own = [torch.tensor([0.0, 1.0, 2.0, 3.0])]
    honest = {1: [torch.tensor([0.1, 1.1, 2.1, 3.1])], 2: [torch.tensor([-0.1, 0.9, 1.9, 2.9])]}
    for big in (1e3, 1e6):  # the outlier's size does not matter, only that it is an extreme value
        bad = [torch.tensor([big, -big, 2.05, big])]
        m = RobustMixer(0, {0: 0.25, 1: 0.25, 2: 0.25, 4: 0.25}, "trim", trim=1)
        out = m.mix(own, {**honest, 4: bad})[0]
        # per coordinate: sort the 4 values, drop the smallest and the largest, average the middle two
        want = torch.tensor([(0.0 + 0.1) / 2, (0.9 + 1.0) / 2, (2.0 + 2.05) / 2, (3.0 + 3.1) / 2])
        assert torch.allclose(out, want, atol=1e-6), out
        assert m.last.mode == "trim"


def test_trim_on_a_ring_is_the_coordinate_wise_median():
    own = _block(0)
    theirs = {1: _block(1), 7: _block(2)}
    out = RobustMixer(0, RING, "trim").mix(own, theirs)
    med = [torch.stack([own[k], theirs[1][k], theirs[7][k]]).median(dim=0).values for k in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(out, med))


def test_trim_falls_back_to_clip_when_the_degree_is_too_small_and_says_so_once():
    said = []
    own = _block(0)
    m = RobustMixer(0, RING, "trim", trim=2, log=said.append)  # 2*2+1 = 5 values needed, a ring peer has 3
    for s in range(3):
        out = m.mix(own, {1: _near(own, s, 0.01), 7: [x * 1000 for x in own]})
        assert m.last.mode == "clip" and list(m.last.clipped) == [7]
    assert len([s for s in said if "clip instead" in s]) == 1
    assert _norm(_sub(out, own)) <= (RING[1] + RING[7]) * m.last.tau * (1 + 1e-6)


def test_flagging_catches_a_x1000_neighbour_and_no_honest_one():
    said = []
    own = _block(0)
    for mode in ("clip", "trim"):
        m = RobustMixer(0, EXP, mode, log=said.append)
        first = None
        for step in range(40):
            theirs = {j: _near(own, 100 * step + j, 0.01 * (1 + 0.5 * math.sin(3 * step + j))) for j in EXP if j != 0}
            theirs[4] = [x * 1000 for x in own]
            m.mix(own, theirs, seq=step)
            assert set(m.last.flagged) <= {4}
            if m.last.flagged and first is None:
                first = step
        assert first == FLAG_MIN - 1  # hard-clipped every time: flagged at its 4th exchange
        assert m.first_flagged == {4: first} and m.flag_counts[4] == 40 - first
        assert m.final_record()["flagged"] == {"4": 40 - first}
    assert len([s for s in said if "neighbour 4 flagged" in s]) == 2  # once per mixer


def test_honest_ring_neighbours_at_different_distances_are_not_flagged():
    own = _block(0)
    m = RobustMixer(0, RING, "clip")
    for step in range(60):  # one neighbour consistently 3x further than the other, both wobbling
        m.mix(own, {1: _near(own, 2 * step, 0.01 * (1 + 0.3 * math.sin(step))),
                    7: _near(own, 2 * step + 1, 0.03 * (1 + 0.3 * math.cos(step)))})
        assert m.last.flagged == []


def _moving(step, drift=0.02):
    """θ½ of a peer training: it moves by a fixed step (norm ~10 x drift) each exchange, plus a little noise."""
    return [b + step * d + 0.001 * n for b, d, n in zip(_block(0), _block(1, drift), _block(1000 + step))]


def test_a_fast_far_neighbour_is_flagged_and_a_far_one_moving_with_us_is_not():
    """dissensus-like: at an honest-like distance (beyond tau, not beyond 2 tau) but jumping between exchanges far
    more than the peer's own block moves: clipped hard, left out, flagged. An honest neighbour 3x farther than the
    other, moving with the peer, and a near neighbour moving fast (within tau) are never flagged."""
    m = RobustMixer(0, RING, "clip")
    far = RobustMixer(0, RING, "clip")
    flagged_at = None
    for step in range(40):
        own = _moving(step)
        near = _near(own, 2 * step, 0.01 * (1 + 0.3 * math.sin(step)))
        sign = 1 if step % 2 else -1  # swings around the peer: distance ~ 2.5x the near one, moves ~5x ours
        bad = [o + sign * 0.04 * d for o, d in zip(own, _block(7))]
        honest_far = [o + 0.03 * d + 0.001 * e for o, d, e in zip(own, _block(8), _block(300 + step))]
        m.mix(own, {1: near, 7: bad}, seq=step)
        if step >= 1:
            assert m.last.speed[7] > SPEED and m.last.speed[1] < SPEED
        if 7 in m.last.flagged and flagged_at is None:
            flagged_at = step
        assert 1 not in m.last.flagged
        far.mix(own, {1: near, 7: honest_far}, seq=step)
        assert far.last.flagged == [], step
        assert far.last.mixed == [1, 7]  # clipped (from the median rule on), never left out
    assert flagged_at is not None and flagged_at <= FLAG_MIN + 2, flagged_at
    assert 1 not in m.flag_counts
    # neighbours that move fast but stay within tau (here: ours moves slowly) are mixed as they are
    m = RobustMixer(0, RING, "clip")
    for step in range(30):
        own = _moving(step, drift=0.005)
        jumpy = [o + (0.008 if step % 2 else -0.008) * d for o, d in zip(own, _block(9))]
        m.mix(own, {1: _near(own, 2 * step, 0.01), 7: jumpy}, seq=step)
        if step >= 1:
            assert m.last.speed[7] > SPEED
        assert m.last.flagged == [] and m.last.mixed == [1, 7]


def test_speed_needs_the_previous_exchange_of_the_same_activation():
    m = RobustMixer(0, RING, "clip")
    m.mix(_moving(0), {1: _near(_moving(0), 1, 0.01), 7: _near(_moving(0), 2, 0.01)})
    assert m.last.speed == {}  # nothing to compare with yet
    m.mix(_moving(1), {1: _near(_moving(1), 3, 0.01)})  # 7 missing
    assert set(m.last.speed) == {1}
    m.mix(_moving(2), {1: _near(_moving(2), 5, 0.01), 7: _near(_moving(2), 6, 0.01)})
    assert set(m.last.speed) == {1}  # 7 was not there at the previous exchange
    m.begin_activation()
    m.mix(_moving(3), {1: _near(_moving(3), 7, 0.01), 7: _near(_moving(3), 8, 0.01)})
    assert m.last.speed == {}


def test_distances_do_not_depend_on_torch_threads():
    own = _block(0)
    big = [torch.randn(300_000, dtype=torch.float32)]
    other = [torch.randn(300_000, dtype=torch.float32)]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = robust.sq_distance(other, [big[0].double()])
        torch.set_num_threads(max(2, n))
        b = robust.sq_distance(other, [big[0].double()])
    finally:
        torch.set_num_threads(n)
    assert a == b
    assert own  # (the block helper is exercised elsewhere)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_distances_are_the_float64_ones_exactly_and_samples_keep_the_blocks_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(301, 17, generator=g).to(dtype), torch.randn(999, generator=g).to(dtype)]
    b = [t + torch.randn(t.shape, generator=g).to(dtype) * 1e-2 for t in a]
    # the reference: both widened to float64 first, then numpy's pairwise sum of the squares, tensor by tensor
    ref = sum(float(np.square(x.double().numpy().ravel() - y.double().numpy().ravel()).sum()) for x, y in zip(a, b))
    assert robust.sq_distance(a, b) == ref
    s = robust.sample(a, 3)
    assert [t.dtype for t in s] == [dtype, dtype] and [t.numel() for t in s] == [(301 * 17 + 2) // 3, 333]
    s[0].zero_()  # a copy: the block itself is untouched
    assert bool(a[0].abs().sum() > 0)


def test_mixer_rejects_bad_settings():
    with pytest.raises(ValueError):
        RobustMixer(0, RING, "median")
    with pytest.raises(ValueError):
        RobustMixer(0, RING, "clip", tau=-1)
    with pytest.raises(ValueError):
        RobustMixer(0, RING, "trim", trim=0)


# ---------------------------------------------------------------------------------------------- attacks

def test_attack_specs_parse_and_bad_ones_are_config_errors():
    assert parse("x1000@3") == ("scale", 1000.0, [3])
    assert parse("signflip@3,5") == ("signflip", 0.0, [3, 5])
    assert parse("constant:0.5@1") == ("constant", 0.5, [1])
    assert parse("dissensus@2") == ("dissensus", 1.5, [2])
    for bad in ("signflip", "x@3", "nope@3", "signflip@a", "xinf@1"):
        with pytest.raises(ValueError):
            parse(bad)
        with pytest.raises(ConfigError):
            make_config(None, {"attack": bad})
    cfg = make_config(None, {"attack": "gaussian@3", "robust": "clip"})
    assert make_attack(cfg, 3, RING) is not None and make_attack(cfg, 2, RING) is None
    with pytest.raises(ConfigError):
        make_config(None, {"robust": "median"})
    with pytest.raises(ConfigError):
        make_config(None, {"robust_trim": 0})


def test_attacks_transform_only_the_published_block():
    own = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    keep = {k: v.clone() for k, v in own.items()}
    out = Attack("scale", 10.0, 3, RING)(own, {}, 0, True)
    assert torch.equal(out["a"], torch.tensor([10.0, -20.0]))
    assert torch.equal(Attack("signflip", 0.0, 3, RING)(own, {}, 0, True)["b"], torch.tensor([[-3.0]]))
    assert torch.equal(Attack("constant", 1.0, 3, RING)(own, {}, 0, True)["a"], torch.ones(2))
    g1 = Attack("gaussian", 0.0, 3, RING, seed=1)({"w": torch.full((4000,), 2.0)}, {}, 5, False)["w"]
    g2 = Attack("gaussian", 0.0, 3, RING, seed=1)({"w": torch.full((4000,), 2.0)}, {}, 5, False)["w"]
    assert torch.equal(g1, g2) and abs(float(g1.std()) - 2.0) < 0.1
    assert all(torch.equal(own[k], keep[k]) for k in own)


def test_dissensus_reverses_the_neighbourhood_pull():
    row = {3: 1 / 3, 2: 1 / 3, 4: 1 / 3}
    own = {"w": torch.tensor([0.0, 0.0])}
    copies = {2: {"w": torch.tensor([1.0, 0.0])}, 4: {"w": torch.tensor([1.0, 2.0])}}
    att = Attack("dissensus", 1.5, 3, row)
    out = att(own, copies, 7, False)["w"]
    # target 2 (lowest id); its neighbourhood pulls it towards 4: send x_2 - 1.5 (x_4 - x_2)
    assert torch.allclose(out, torch.tensor([1.0, -3.0]))
    assert torch.equal(att(own, copies, 6, True)["w"], own["w"])  # first exchange of an activation: honest
    assert torch.equal(att(own, {2: {"other": torch.zeros(2)}, 4: None}, 7, False)["w"], own["w"])  # no usable copies


def test_a_flagged_neighbour_is_left_out_until_it_behaves_again():
    own = _block(0)
    m = RobustMixer(0, EXP, "clip")

    def honest(step):
        return {j: _near(own, 100 * step + j, 0.01 * (1 + 0.2 * math.sin(step + j))) for j in (1, 2, 8)}

    for step in range(20):
        theirs = {**honest(step), 4: [x * 1000 for x in own]}
        out = m.mix(own, theirs)
    assert m.last.flagged == [4]
    # left out exactly like a missing neighbour: its weight goes to the self weight
    without = RobustMixer(0, EXP, "none").mix(own, honest(19))
    assert all(torch.equal(a, b) for a, b in zip(out, without))
    for k in range(1, 12):  # it turns honest: mixed again once fewer than half of its last 16 blocks were bad
        m.mix(own, {**honest(100 + k), 4: _near(own, 7 * k, 0.01)})
        assert (4 in m.last.flagged) == (k <= FLAG_WINDOW // 2)
    assert 4 not in m.last.clipped


def test_cluster_live_view_shows_flagged_neighbours(tmp_path):
    import json

    from deca_p2p.cluster import _live_table, _Tail
    from deca_p2p.topology import ring

    class Running:
        def poll(self):
            return None

    tails = {}
    for i, flagged in ((0, []), (1, [2])):
        f = tmp_path / f"m{i}.jsonl"
        recs = [{"event": "step", "round": 0, "block": 1, "step": 0, "loss": 1.0, "flagged": flagged},
                {"event": "step", "round": 0, "block": 1, "step": 1, "loss": 1.0}]  # a local step: no field
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        tails[i] = _Tail(f)
        tails[i].poll()
    table = _live_table(ring(2), {0: Running(), 1: Running()}, tails, 0.0)
    col = next(c for c in table.columns if c.header == "flagged")
    assert list(col.cells) == ["", "2"]


def test_excluded_neighbours_are_never_mixed_in_any_mode():
    own = _block(0)
    theirs = {1: _near(own, 1, 0.01), 7: [x * 1000 for x in own]}
    want = RobustMixer(0, RING, "none").mix(own, {1: theirs[1]})
    for mode in ("none", "clip", "trim"):
        out = RobustMixer(0, RING, mode, exclude=[7]).mix(own, theirs)
        # (trim falls back to clip with two blocks; clip leaves the honest one untouched)
        assert all(torch.equal(a, b) for a, b in zip(out, want)), mode
    cfg = make_config(None, {"robust_exclude": "7, 3"})
    assert robust.make_mixer(cfg, 0, RING).exclude == {3, 7}
    with pytest.raises(ConfigError):
        make_config(None, {"robust_exclude": "seven"})


def test_clip_clips_a_moderate_outlier_to_tau_and_leaves_a_gross_one_out():
    tau = 0.25  # explicit: τ = 0.25 x ‖θ½‖ = 1
    own = [torch.tensor([0.0, 0.0, 0.0, 4.0])]     # ‖θ½‖ = 4 -> τ = 1
    honest = [own[0] + torch.tensor([0.8, 0.0, 0.0, 0.0])]
    moderate = [own[0] + torch.tensor([0.0, 1.5, 0.0, 0.0])]   # τ < 1.5 <= 2τ: enters at radius τ
    gross = [own[0] + torch.tensor([0.0, 0.0, 2.5, 0.0])]      # > 2τ: left out of this exchange
    m = RobustMixer(0, RING, "clip", tau=tau)
    out = m.mix(own, {1: honest, 7: moderate})[0]
    assert torch.allclose(out, own[0] + torch.tensor([0.8, 1.0, 0.0, 0.0]) / 3, atol=1e-6)
    assert m.last.clipped == {7: pytest.approx(1.5)}
    out = m.mix(own, {1: honest, 7: gross})[0]
    assert torch.equal(out, RobustMixer(0, RING, "none").mix(own, {1: honest})[0])
    assert m.last.clipped == {7: pytest.approx(2.5)}


def test_dp_noise_raises_the_cold_radius_so_honest_noisy_neighbours_are_mixed():
    """With DP every release carries N(0, s²) per element: two honest blocks are ~sqrt(2n)·s apart whatever they
    learnt. Activations of two exchanges (the cold one and one more) used to leave both honest neighbours out at
    every first exchange and flag them by the fourth; with the noise floor nobody is left out or flagged, and a x1000
    neighbour still is."""
    own0 = _block(0)
    n = sum(t.numel() for t in own0)
    s = 1.0  # noise std: two honest releases are sqrt(2n) s apart, beyond 2 x the cold radius of a noisy block
    assert math.sqrt(2 * n) * s > 2 * COLD_TAU * math.sqrt(_norm(own0) ** 2 + n * s * s)  # HARD_CLIP = 2

    def noisy(block, seed):
        g = torch.Generator().manual_seed(seed)
        return [t + s * torch.randn(t.shape, generator=g) for t in block]

    def run(noise_std, attacker=False):
        m = RobustMixer(0, RING, "clip", noise_std=noise_std)
        left_out = 0
        for act in range(6):
            m.begin_activation()
            for k in range(2):
                seed = 100 * act + 10 * k
                own = noisy(own0, seed)
                theirs = {1: noisy(own0, seed + 1), 7: noisy(own0, seed + 2)}
                if attacker:
                    theirs[7] = [t * 1000 for t in theirs[7]]
                m.mix(own, theirs)
                left_out += 2 - len(m.last.mixed)
        return left_out, m.final_record()["flagged"]

    assert set(run(0.0)[1]) == {"1", "7"}  # without the floor: both honest neighbours end flagged
    assert run(s) == (0, {})
    left_out, flagged = run(s, attacker=True)
    assert left_out == 12 and set(flagged) == {"7"}  # the x1000 one, at every exchange; the honest one never


def test_gaussian_attack_takes_any_seed_the_config_allows():
    from deca_p2p.config import MAX_SEED

    out = Attack("gaussian", 0.0, 3, RING, seed=MAX_SEED - 1)({"w": torch.ones(8)}, {}, 10**6, False)["w"]
    assert out.shape == (8,) and torch.isfinite(out).all()
