"""The fast weight-matching path must find what the plain definition finds.

``weight_matching`` caches constant cost terms, updates the others by low-rank corrections, skips solves
whose cost matrix cannot have changed and solves a reduced copy of each assignment problem. None of that may
change the method: on random cases these tests compare its permutations and objective with
``weight_matching_reference``, which rebuilds every cost from scratch, and check each cached term against a
fresh rebuild.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pluribus.errors import ConfigError
from pluribus.fusion.core.matching import (
    WeightMatcher,
    align,
    match_many,
    max_assignment,
    similarity_matrix,
    weight_matching,
    weight_matching_reference,
)
from pluribus.fusion.core.models import MLP, SmallCNN
from pluribus.fusion.core.spec import (
    AxisRef,
    PermutationSpec,
    apply_perms,
    invert_perm,
    random_perms,
    spec_for,
)


def _noisy(params, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in params.items()}


def _mlp_pair(seed, hidden=(40, 32)):
    torch.manual_seed(seed)
    a = MLP(30, hidden, 6).state_dict()
    torch.manual_seed(seed + 100)
    b = MLP(30, hidden, 6).state_dict()
    return spec_for(MLP(30, hidden, 6)), _noisy(a, seed, 0.05), _noisy(b, seed + 1, 0.05)


def _cnn_pair(seed):
    def make(s):
        torch.manual_seed(s)
        model = SmallCNN(1, (6, 8), 12, 5, 8)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.normal_()
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
        return model

    model = make(seed)
    return spec_for(model), model.state_dict(), make(seed + 50).state_dict()


def _objective(spec, ref, other, perms):
    """The Re-Basin objective: sum over perms of <P, C> is not separable, so use the aligned inner product."""
    aligned = apply_perms(spec, other, perms)
    keys = {r.param for refs in spec.axes.values() for r in refs if r.param in ref}
    return sum(float((ref[k].double() * aligned[k].double()).sum()) for k in keys)


def _assert_same(spec, fast, slow):
    for name in spec.sizes:
        assert torch.equal(fast[name], slow[name]), name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fast_mlp_matching_equals_the_reference(seed):
    spec, ref, other = _mlp_pair(seed)
    fast = weight_matching(spec, ref, other, seed=seed)
    slow = weight_matching_reference(spec, ref, other, seed=seed)
    _assert_same(spec, fast, slow)
    assert _objective(spec, ref, other, fast) == pytest.approx(_objective(spec, ref, other, slow), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_cnn_matching_equals_the_reference(seed):
    """Conv tensors (4-D), BatchNorm vectors, the shared residual permutation and the fc1 block axis."""
    spec, ref, other = _cnn_pair(seed)
    _assert_same(spec, weight_matching(spec, ref, other, seed=seed), weight_matching_reference(spec, ref, other, seed=seed))


def test_fast_matching_with_activation_statistics_equals_the_reference():
    spec, ref, other = _mlp_pair(7)
    g = torch.Generator().manual_seed(0)
    acts_a = {name: torch.rand(n, generator=g) for name, n in spec.sizes.items()}
    acts_b = {name: torch.rand(n, generator=g) for name, n in spec.sizes.items()}
    kw = {"ref_acts": acts_a, "other_acts": acts_b, "act_weight": 0.7, "seed": 3}
    _assert_same(spec, weight_matching(spec, ref, other, **kw), weight_matching_reference(spec, ref, other, **kw))


def test_a_tensor_permuted_on_both_axes_by_one_perm():
    """A perm whose cost depends on itself (a square recurrent-style matrix) takes the same path as the reference."""
    spec = PermutationSpec(
        {"a": 9, "b": 7},
        {"a": (AxisRef("x", 0), AxisRef("y", 0), AxisRef("y", 1), AxisRef("z", 1)),
         "b": (AxisRef("z", 0), AxisRef("w", 1))},
        ("a", "b"),
    )
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        shapes = {"x": (9, 5), "y": (9, 9), "z": (7, 9), "w": (3, 7)}
        ref = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        other = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        _assert_same(spec, weight_matching(spec, ref, other, seed=seed),
                     weight_matching_reference(spec, ref, other, seed=seed))


def test_cached_terms_equal_a_fresh_rebuild_and_the_shortcuts_are_used():
    """Every low-rank-updated term equals the cost rebuilt from scratch; solves were skipped and terms updated."""
    spec, ref, other = _mlp_pair(5, hidden=(64, 48))
    matcher = WeightMatcher(spec, ref)
    perms = matcher.match(other, seed=5)
    assert matcher.stats["skipped"] > 0 and matcher.stats["updated_terms"] > 0  # else the test proves nothing
    for name in spec.sizes:
        fresh = similarity_matrix(spec, name, ref, other, perms)
        cached = matcher.cost(name, perms)
        assert torch.allclose(cached, fresh, rtol=0, atol=1e-12 * float(fresh.abs().max())), name
    # and after a further low-rank step: swap two units of one perm, the cached cost of the other follows
    moved = {k: v.clone() for k, v in perms.items()}
    moved["h1"][[0, 1]] = moved["h1"][[1, 0]]
    updates = matcher.stats["updated_terms"]
    assert torch.allclose(matcher.cost("h0", moved), similarity_matrix(spec, "h0", ref, other, moved), rtol=0,
                          atol=1e-12 * float(fresh.abs().max()))
    assert matcher.stats["updated_terms"] == updates + 1


def test_one_matcher_for_many_parties_equals_separate_reference_runs():
    spec, ref, _ = _mlp_pair(0)
    others = [_mlp_pair(s)[2] for s in (1, 2, 3)]
    aligned = match_many(spec, [ref, *others], seed=10)
    for k, other in enumerate(others, start=1):
        slow = apply_perms(spec, other, weight_matching_reference(spec, ref, other, seed=10 + k))
        assert all(torch.equal(aligned[k][key], slow[key]) for key in slow)
    via_align = align(spec, ref, others[0], seed=11)
    assert all(torch.equal(via_align[key], aligned[1][key]) for key in via_align)


def test_reduced_assignment_equals_scipy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 17, 120):
        c = rng.normal(size=(n, n)) * rng.uniform(0.1, 10.0)
        assert np.array_equal(max_assignment(c), linear_sum_assignment(c, maximize=True)[1])
    # ties (integer costs): the optimum may differ in which tied assignment it picks, never in value
    for _ in range(5):
        c = rng.integers(0, 4, size=(30, 30)).astype(float)
        rows = np.arange(30)
        assert c[rows, max_assignment(c)].sum() == c[rows, linear_sum_assignment(c, maximize=True)[1]].sum()


def test_forward_start_places_each_perm_from_the_input_side_then_descends():
    spec, ref, other = _mlp_pair(4)
    matcher = WeightMatcher(spec, ref)
    placed = matcher.match(other, start="forward", max_sweeps=0)  # the start alone
    # h0 sees only its own rows (W0, b0): nothing after it is placed yet
    c0 = similarity_matrix(spec, "h0", {k: v for k, v in ref.items() if k != "layers.1.weight"},
                           {k: v for k, v in other.items() if k != "layers.1.weight"}, placed)
    assert torch.equal(placed["h0"], torch.as_tensor(linear_sum_assignment(c0.numpy(), maximize=True)[1]))
    c1 = similarity_matrix(spec, "h1", ref, other, placed)  # h1 sees W1 rows with h0 placed, b1, W2 columns
    assert torch.equal(placed["h1"], torch.as_tensor(linear_sum_assignment(c1.numpy(), maximize=True)[1]))
    assert matcher.stats["start_solves"] == 2 and matcher.stats["solves"] == 0
    # then the same descent as the reference, started from those perms
    _assert_same(spec, weight_matching(spec, ref, other, start="forward", seed=2),
                 weight_matching_reference(spec, ref, other, init=placed, seed=2))


@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_forward_start_recovers_a_planted_permutation(make):
    spec, ref, _ = _mlp_pair(0) if make == "mlp" else _cnn_pair(0)
    planted = random_perms(spec, generator=torch.Generator().manual_seed(9))
    other = _noisy(apply_perms(spec, ref, planted), 1, 1e-3)
    found = weight_matching(spec, ref, other, start="forward")
    assert all(torch.equal(found[k], invert_perm(planted[k])) for k in planted)


def test_unknown_start_is_a_config_error():
    spec, ref, other = _mlp_pair(0)
    with pytest.raises(ConfigError, match="start"):
        weight_matching(spec, ref, other, start="random")


@pytest.mark.parametrize("make", ["mlp", "cnn"])
def test_a_tolerance_keeps_fast_equal_to_the_reference_and_refuses_small_gains(make):
    spec, ref, other = _mlp_pair(5, hidden=(64, 48)) if make == "mlp" else _cnn_pair(5)
    for tol in (1e-3, 3e-2):
        _assert_same(spec, weight_matching(spec, ref, other, seed=3, tol=tol),
                     weight_matching_reference(spec, ref, other, seed=3, tol=tol))
    exact, loose = WeightMatcher(spec, ref), WeightMatcher(spec, ref)
    p_exact = exact.match(other, seed=3)
    p_loose = loose.match(other, seed=3, tol=3e-2)
    if make == "mlp":  # on this pair the tolerance stops the descent earlier ...
        assert loose.stats["solves"] < exact.stats["solves"]
    assert p_exact.keys() == p_loose.keys()
    # ... and a refused step is one that would have gained less than tol of its objective
    for name in spec.order:
        c = loose.cost(name, p_loose).numpy()
        rows = np.arange(c.shape[0])
        best, now = c[rows, max_assignment(c)].sum(), c[rows, p_loose[name].numpy()].sum()
        assert best <= now + 3e-2 * abs(now) + 1e-9


def test_the_fusion_defaults_are_the_measured_ones_and_a_bad_tolerance_is_refused():
    from pluribus.fusion.core.config import FusionConfig

    cfg = FusionConfig()
    assert (cfg.match_start, cfg.match_tol) == ("forward", 1e-2)  # docs/results/fusion.md "Speed" measured these
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="match_tol"):
            FusionConfig(match_tol=bad)
    spec, ref, other = _mlp_pair(0)
    with pytest.raises(ConfigError, match="tolerance"):
        weight_matching(spec, ref, other, tol=-1.0)
