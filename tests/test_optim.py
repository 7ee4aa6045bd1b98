"""The DECA maths pinned down (DESIGN §2): Adam equivalence, pure gossip, average preservation, BMA readings."""
import numpy as np
import pytest
import torch

from deca_p2p.optim import DECA, DSGD, MixAccumulator, make_optimizer


def _quadratic_grad(p, target):
    p.grad = (p.detach() - target) * 2.0 + 0.1 * torch.sin(p.detach() * 3)


def test_one_peer_without_bma_equals_torch_adam():
    torch.manual_seed(0)
    init = [torch.randn(7, 5), torch.randn(11)]
    targets = [torch.randn_like(t) for t in init]
    ours = [t.clone() for t in init]
    ref = [t.clone().requires_grad_(True) for t in init]
    deca = DECA(ours, lr=1e-2, betas=(1.0, 1.0))
    adam = torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    worst = 0.0
    for _ in range(50):
        for p, t in zip(ours, targets):
            _quadratic_grad(p, t)
        for p, t in zip(ref, targets):
            _quadratic_grad(p, t)
        deca.local_step()
        deca.mix([p.clone() for p in ours])  # one peer: the mix is its own θ½
        adam.step()
        worst = max(worst, max(float((a - b.detach()).abs().max()) for a, b in zip(ours, ref)))
    assert worst <= 1e-6


def _ring_w(n):
    w = np.zeros((n, n))
    for i in range(n):
        for j in ((i - 1) % n, (i + 1) % n):
            w[i, j] = 1 / 3
        w[i, i] = 1 / 3
    return w


def _gossip_round(opts, thetas, w):
    for o in opts:
        for p in o.params:
            p.grad = torch.randn_like(p)  # ignored at lr = 0 except through the moments
        o.local_step()
    mixed = []
    for i in range(len(opts)):
        acc = MixAccumulator(thetas[i])
        for j in np.nonzero(w[i])[0]:
            acc.add(thetas[j], float(w[i, j]))
        mixed.append(acc.result())
    for o, m in zip(opts, mixed):
        o.mix(m)


def _disagreement(thetas):
    x = torch.stack([torch.cat([p.flatten() for p in t]) for t in thetas]).double()
    return float((x - x.mean(0)).norm()), x.mean(0)


@pytest.mark.parametrize("discrepancy", ["paper", "none"])
def test_pure_gossip_contracts_at_slem_and_keeps_average(discrepancy):
    n = 8
    w = _ring_w(n)
    slem = sorted(abs(np.linalg.eigvalsh(w)))[-2]
    torch.manual_seed(1)
    thetas = [[torch.randn(64), torch.randn(4, 4)] for _ in range(n)]
    opts = [DECA(t, lr=0.0, discrepancy=discrepancy) for t in thetas]
    d0, mean0 = _disagreement(thetas)
    dists = [d0]
    for _ in range(40):
        _gossip_round(opts, thetas, w)
        d, mean = _disagreement(thetas)
        dists.append(d)
        assert torch.allclose(mean, mean0, atol=1e-6)  # W doubly stochastic: the average never moves
    rate = (dists[40] / dists[20]) ** (1 / 20)
    assert abs(rate - slem) / slem < 0.05, (rate, slem)
    assert abs(dists[31] / dists[30] - slem) / slem < 0.05


def test_bma_readings_differ_as_designed():
    torch.manual_seed(2)
    base = torch.randn(10)
    grad = torch.randn(10)
    mixed = base + 0.01 * torch.randn(10)
    res = {}
    for disc in ("paper", "qg", "none"):
        p = base.clone()
        o = DECA([p], lr=1e-3, discrepancy=disc)
        p.grad = grad.clone()
        o.local_step()
        m_half = o.m[0].clone()
        o.mix([mixed])
        assert torch.equal(p, mixed)
        res[disc] = (m_half, o.m[0].clone())
    m_half, m = res["none"]
    assert torch.equal(m, m_half)  # no BMA: the moments stay at m½
    m_half, m = res["paper"]
    assert torch.allclose(m, 0.9 * m_half + 0.1 * (mixed - base), atol=1e-7)
    m_half, m = res["qg"]
    assert torch.allclose(m, 0.9 * m_half + 0.1 * (base - mixed) / 1e-3, atol=1e-5)


def test_reset_clears_moments_and_restarts_bias_correction():
    p = torch.zeros(3)
    o = DECA([p], lr=0.1)
    p.grad = torch.ones(3)
    o.local_step()
    o.mix([p.clone()])
    o.reset()
    assert o.step_count == 0 and float(o.m[0].abs().sum()) == 0.0
    # the first step after a reset is a full-size Adam step (bias correction restarted): |Δ| ≈ lr
    before = p.clone()
    p.grad = torch.ones(3)
    o.local_step()
    assert torch.allclose(before - p, torch.full((3,), 0.1), atol=1e-6)


def test_dsgd_and_factory():
    p = torch.ones(2)
    o = DSGD([p], lr=0.5)
    p.grad = torch.ones(2)
    o.local_step()
    assert torch.equal(p, torch.full((2,), 0.5))
    assert make_optimizer("dadam", [torch.zeros(1)], 0.1).discrepancy == "none"
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_optimizer("sgd", [torch.zeros(1)], 0.1)
    with pytest.raises(ValueError, match="discrepancy"):
        DECA([torch.zeros(1)], 0.1, discrepancy="bogus")


def test_consensus_reading_by_hand():
    """h = (θ½ − θ_{r+1}) / γ: the consensus pull alone, at gradient scale; worked out with plain numbers."""
    lr, a1, a2, b1, b2 = 0.1, 0.9, 0.99, 0.8, 0.95
    p = torch.tensor([1.0, -2.0])
    o = DECA([p], lr=lr, alphas=(a1, a2), betas=(b1, b2), eps=0.0, discrepancy="consensus")
    p.grad = torch.tensor([0.5, -1.0])
    o.local_step()
    # first Adam step: m½ = 0.1 g, v½ = 0.01 g²; bias-corrected m̂ = g, v̂ = g²: θ½ = θ − lr · sign(g)
    half = torch.tensor([1.0 - 0.1, -2.0 + 0.1])
    assert torch.allclose(p, half, atol=1e-6)
    mixed = torch.tensor([0.5, -1.0])  # θ_{r+1}
    o.mix([mixed])
    h = (half - mixed) / lr  # [4.0, -9.0]
    assert torch.allclose(o.m[0], b1 * (1 - a1) * torch.tensor([0.5, -1.0]) + (1 - b1) * h, atol=1e-5)
    assert torch.allclose(o.v[0], b2 * (1 - a2) * torch.tensor([0.25, 1.0]) + (1 - b2) * h * h, atol=1e-5)
    assert o.last_stats["h_norm"] == pytest.approx(float(h.norm()), rel=1e-6)
    with pytest.raises(ValueError, match="divides by the learning rate"):
        DECA([torch.zeros(1)], 0.0, discrepancy="consensus")


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation `fn` makes (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_float64_sums_are_chunked_and_agree_with_the_whole_tensor_formulas():
    from deca_p2p import robust
    from deca_p2p.optim import F64_CHUNK, f64_sum
    from deca_p2p.privacy import clip_and_noise

    g = torch.Generator().manual_seed(0)
    t, r = (torch.randn(3 * F64_CHUNK + 7, generator=g) for _ in range(2))
    assert f64_sum(t) == pytest.approx(float(t.double().pow(2).sum()), rel=1e-12)
    assert f64_sum(t, r) == pytest.approx(float((t - r).double().pow(2).sum()), rel=1e-12)
    assert f64_sum(t, square=False) == pytest.approx(float(t.double().sum()), rel=1e-9)
    assert f64_sum(torch.empty(0)) == 0.0
    # across chunks, exactly numpy's pairwise sums chunk by chunk (a slicing slip would change them)
    chunks = [(t[lo:lo + F64_CHUNK].double() - r[lo:lo + F64_CHUNK].double()).numpy()
              for lo in range(0, t.numel(), F64_CHUNK)]
    assert robust.sq_distance([t], [r]) == sum(float(np.square(c).sum()) for c in chunks)
    assert robust.sq_distance([t], [r]) == pytest.approx(float((t.double() - r.double()).pow(2).sum()), rel=1e-12)
    assert f64_sum(t, r) == sum(float(np.square((t - r)[lo:lo + F64_CHUNK].double().numpy()).sum())
                                for lo in range(0, t.numel(), F64_CHUNK))
    bound = 8 * F64_CHUNK  # one float64 chunk, never a tensor-sized float64 copy (3 x that here)
    assert _largest_allocation(lambda: float(t.double().pow(2).sum())) > bound  # the check can fail
    assert _largest_allocation(lambda: f64_sum(t, r)) <= bound
    assert _largest_allocation(lambda: robust.sq_distance([t], [r])) <= bound
    p = torch.nn.Parameter(t.clone())
    p.grad = r.clone()
    opt = DECA([p], lr=1e-3)
    assert _largest_allocation(opt.local_step) <= 4 * t.numel() + 64  # Adam's own float32 temporaries at most
    assert opt.last_stats["grad_norm"] == pytest.approx(float(r.double().norm()), rel=1e-12)
    assert _largest_allocation(lambda: opt.mix([p.detach().clone()])) <= 4 * t.numel() + 64
    q = t.clone() + 1e-3
    assert _largest_allocation(lambda: clip_and_noise([q], [t], 1e9, 0.0, g)) <= 4 * t.numel() + 64
