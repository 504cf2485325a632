import math

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, DataError
from pluribus.fusion.privacy.ldp import (
    HYBRID_EPS_STAR,
    MECHANISMS,
    DuchiMechanism,
    HybridMechanism,
    LaplaceMechanism,
    PiecewiseMechanism,
    analytic_gaussian_sigma,
    hybrid_alpha,
    make_mechanism,
)
from pluribus.fusion.privacy.noise import SeededNoise, SystemNoise

N = 200_000


@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("value", [-0.5, 0.1, 1.0])
def test_unbiased_and_variance_matches_formula(name, value):
    mech = make_mechanism(name, 1.5, lo=-0.5, hi=1.0, delta=1e-4)
    x = torch.full((N,), value)
    out = mech(x, noise=SeededNoise(1)).double()
    var = float(mech.variance(x[:1]))
    assert abs(float(out.mean()) - value) < 5 * math.sqrt(var / N)
    assert float(out.var()) == pytest.approx(var, rel=0.03)


def test_inputs_are_clipped_before_perturbation():
    mech = make_mechanism("piecewise", 2.0, lo=-1.0, hi=1.0)
    out = mech(torch.full((N,), 7.0), noise=SeededNoise(0)).double()
    assert abs(float(out.mean()) - 1.0) < 0.02  # estimates the clipped value, not 7
    assert float(out.abs().max()) <= mech.bound + 1e-9


def _audit(mech, n=400_000, bins=60, min_count=400, seed=0):
    """Largest empirical log-likelihood ratio over histogram bins for the two extreme inputs."""
    g = SeededNoise(seed)
    a = mech(torch.full((n,), mech.lo), noise=g).double().numpy()
    b = mech(torch.full((n,), mech.hi), noise=g).double().numpy()
    lo, hi = np.quantile(np.concatenate([a, b]), [0.001, 0.999])
    edges = np.concatenate([[-np.inf], np.linspace(lo, hi, bins), [np.inf]])
    if len(np.unique(np.concatenate([a, b]))) <= 2:  # Duchi: two outputs
        edges = np.array([-np.inf, (mech.lo + mech.hi) / 2, np.inf])
    ca, _ = np.histogram(a, edges)
    cb, _ = np.histogram(b, edges)
    ok = (ca >= min_count) & (cb >= min_count)
    return float(np.max(np.abs(np.log(ca[ok] / cb[ok]))))


@pytest.mark.parametrize("cls", [LaplaceMechanism, DuchiMechanism, PiecewiseMechanism, HybridMechanism])
@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_empirical_privacy_loss_within_epsilon(cls, eps):
    mech = cls(eps, -1.0, 1.0)
    loss = _audit(mech)
    assert loss <= eps + 0.15
    assert loss >= eps - 0.35  # these mechanisms attain e^eps somewhere: the audit is not vacuous


def test_audit_catches_an_under_noised_mechanism():
    honest = LaplaceMechanism(1.0, -1.0, 1.0)
    broken = LaplaceMechanism(2.0, -1.0, 1.0)  # half the scale, claimed as eps=1
    assert _audit(broken) > honest.epsilon + 0.5


def test_gaussian_hockey_stick_divergence_within_delta():
    eps, delta = 1.0, 1e-3
    mech = make_mechanism("gaussian", eps, lo=-1.0, hi=1.0, delta=delta)
    g = SeededNoise(0)
    n = 400_000
    a = mech(torch.full((n,), -1.0), noise=g).double().numpy()
    b = mech(torch.full((n,), 1.0), noise=g).double().numpy()
    edges = np.linspace(-6 * mech.sigma, 6 * mech.sigma, 80)
    pa = np.histogram(a, edges)[0] / n
    pb = np.histogram(b, edges)[0] / n
    emp_delta = float(np.maximum(pa - math.exp(eps) * pb, 0).sum())
    assert emp_delta <= delta + 0.005


@pytest.mark.parametrize("eps", [0.3, 1.0, 4.0])
def test_analytic_gaussian_matches_pld_accountant(eps):
    import dp_accounting as dpa
    from dp_accounting import pld

    sigma = analytic_gaussian_sigma(eps, 1e-5, 1.0)
    acc = pld.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(sigma))
    assert acc.get_epsilon(1e-5) == pytest.approx(eps, rel=0.01)
    if eps < 1:
        classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / eps
        assert sigma < classic


def test_hybrid_alpha_minimises_worst_case_variance():
    t = torch.linspace(-1, 1, 201)
    for eps in (1.0, 2.0, 5.0):
        pm, du = PiecewiseMechanism(eps).variance(t), DuchiMechanism(eps).variance(t)

        def worst(a, pm=pm, du=du):
            return float((a * pm + (1 - a) * du).max())

        best = hybrid_alpha(eps)
        assert best == pytest.approx(1 - math.exp(-eps / 2))
        assert worst(best) <= min(worst(best - 0.05), worst(best + 0.05), worst(0.0), worst(1.0)) + 1e-12
    assert hybrid_alpha(HYBRID_EPS_STAR - 0.01) == 0.0
    assert HYBRID_EPS_STAR == pytest.approx(0.61, abs=0.01)


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf, math.nan, 1e5, 1e-9])
def test_bad_epsilon_is_rejected(eps):
    with pytest.raises(ConfigError, match="epsilon"):
        make_mechanism("laplace", eps)


def test_bad_inputs_are_rejected():
    with pytest.raises(ConfigError, match="lo < hi"):
        LaplaceMechanism(1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="unknown mechanism"):
        make_mechanism("exponential", 1.0)
    with pytest.raises(DataError, match="non-finite"):
        make_mechanism("hybrid", 1.0)(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ConfigError, match="delta"):
        make_mechanism("gaussian", 1.0, delta=0.0)


@pytest.mark.parametrize("name", MECHANISMS)
@pytest.mark.parametrize("eps", [0.01, 0.5, 2.0, 8.0, 40.0, 710.0, 1420.0, 5000.0])
def test_realised_epsilon_never_exceeds_the_request_and_large_eps_does_not_overflow(name, eps):
    mech = make_mechanism(name, eps, lo=-0.3, hi=0.7)
    assert 0 < mech.realised_epsilon <= eps
    out = mech(torch.linspace(-1, 1, 101), noise=SeededNoise(0))
    assert torch.isfinite(out).all()
    if eps <= 8:
        assert mech.realised_epsilon == pytest.approx(eps, rel=1e-4)  # the rounding costs no utility here


def _lattice_index(mech, values):
    """The output integer each released value came from (raises if a value is off the mechanism's lattice)."""
    v = values.double().numpy()
    if isinstance(mech, LaplaceMechanism) or mech.name == "gaussian":
        idx = (v - mech.lo) / mech.step
    elif isinstance(mech, DuchiMechanism):
        idx = (v > (mech.lo + mech.hi) / 2).astype(float)
    else:
        a, b, _, _ = mech._affine
        idx = ((2 * v - (mech.hi + mech.lo)) / (mech.hi - mech.lo) - b) / a - 0.5
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-6)
    return np.round(idx).astype(np.int64)


@pytest.mark.parametrize("name", ["laplace", "gaussian", "duchi", "piecewise"])
def test_outputs_lie_on_one_lattice_for_every_input(name):
    mech = make_mechanism(name, 2.0, lo=-0.25, hi=0.5)
    for value in (-0.25, 0.1234567, 0.5):
        out = mech(torch.full((20_000,), value, dtype=torch.float64), noise=SeededNoise(3))
        _lattice_index(mech, out)


def test_clipping_happens_in_float64_after_the_cast():
    c = 0.1  # not representable in bfloat16: clipping there would overshoot it
    mech = make_mechanism("piecewise", 4.0, lo=-c, hi=c)
    x = torch.tensor([5.0, -5.0], dtype=torch.bfloat16)
    assert mech.clip(x).tolist() == [c, -c]
    out = mech(torch.full((200_000,), 5.0, dtype=torch.bfloat16).float(), noise=SeededNoise(0)).double()
    assert abs(float(out.mean()) - c) < 5 * math.sqrt(float(mech.variance(torch.tensor([c]))) / 200_000)
    assert float(out.abs().max()) <= mech.bound * c + 1e-9


def test_secure_noise_is_fresh_and_matches_no_seed():
    mech = make_mechanism("hybrid", 4.0)
    x = torch.zeros(64)
    a, b = mech(x, noise=SystemNoise()), mech(x, noise=SystemNoise())
    assert not torch.equal(a, b)
    assert torch.equal(mech(x, noise=SeededNoise(7, "p")), mech(x, noise=SeededNoise(7, "p")))
    assert not torch.equal(mech(x, noise=SeededNoise(7, "p")), mech(x, noise=SeededNoise(7, "q")))
    # an observer who tries seeds finds the seeded release (the check has power) and never the secure one
    target = mech(x, noise=SeededNoise(123, "p"))
    hits = [s for s in range(300) if torch.equal(mech(x, noise=SeededNoise(s, "p")), target)]
    assert hits == [123]
    assert not any(torch.equal(mech(x, noise=SeededNoise(s, "p")), a) for s in range(300))
    assert SystemNoise.private and not SeededNoise.private


def test_exact_samplers_match_their_distributions():
    src = SeededNoise(11)
    n = 200_000
    counts = np.bincount(src.uniform_below(7, n), minlength=7)
    assert np.all(np.abs(counts - n / 7) < 5 * math.sqrt(n / 7))
    assert src.bernoulli_exp(np.full(n, 3), 2).mean() == pytest.approx(math.exp(-1.5), abs=0.005)
    z = src.discrete_laplace(5, 2, n)  # P(z) ~ exp(-|z| 2/5)
    q = math.exp(-2 / 5)
    assert (z == 0).mean() == pytest.approx((1 - q) / (1 + q), abs=0.005)
    assert z.mean() == pytest.approx(0.0, abs=0.05)
    g = src.discrete_gaussian(4, 3, n)  # sigma^2 = 12
    assert g.var() == pytest.approx(12.0, rel=0.03)
    assert abs(g.mean()) < 0.05


def test_gaussian_delta_is_computed_for_the_discrete_distribution():
    for eps in (0.5, 2.0, 8.0):
        mech = make_mechanism("gaussian", eps, delta=1e-5)
        assert 0 < mech.realised_delta <= 1e-5
        assert mech.sigma == pytest.approx(analytic_gaussian_sigma(eps, 1e-5, 2.0), rel=0.01)
