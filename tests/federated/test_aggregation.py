"""GPAggregation core: PCGrad property, torchjd equivalence, attention, per-layer, bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError, ShapeError
from pluribus.federated.core.aggregation import (
    GPAggregator,
    attention_weights,
    cosine_matrix,
    fixed_orders,
    gp_aggregate,
    gram_matrix,
    pcgrad_coefficients,
    pcgrad_pairwise_loop,
    random_orders,
)
from pluribus.federated.core.config import AggregationConfig

PLAIN_SUM = AggregationConfig(attention="none", combine="sum")


def conflicting(n: int, p: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, p, generator=gen, dtype=torch.float64)
    m[1] = -0.7 * m[0] + 0.3 * m[1]  # a guaranteed conflict
    return m


def sequential_reference(m: torch.Tensor, orders: torch.Tensor, *, modified: bool = False) -> torch.Tensor:
    """Row-by-row PCGrad written the obvious way; asserts orthogonality right after each projection."""
    out = m.clone()
    for i in range(m.shape[0]):
        g = out[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            ref = out[j] if modified else m[j]
            d = g @ ref
            if d < 0:
                g = g - d / (ref @ ref) * ref
                assert abs(float(g @ ref)) < 1e-8 * float(ref.norm() * g.norm() + 1)
        out[i] = g
    return out


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_projection_matches_sequential_pcgrad(n: int) -> None:
    m = conflicting(n, 40, seed=n)
    orders = random_orders(n, torch.Generator().manual_seed(1))
    coef = pcgrad_coefficients(m @ m.T, orders)
    projected = coef @ m
    assert torch.allclose(projected, sequential_reference(m, orders), atol=1e-10)
    out, _ = gp_aggregate(m, config=PLAIN_SUM, orders=orders)
    assert torch.allclose(out, pcgrad_pairwise_loop(m, orders), atol=1e-10)


def test_two_clients_conflict_removed() -> None:
    m = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert float(m[0] @ m[1]) < 0
    projected = pcgrad_coefficients(m @ m.T, fixed_orders(2)) @ m
    assert float(projected[0] @ m[1]) >= -1e-12
    assert float(projected[1] @ m[0]) >= -1e-12
    # and no conflicting pair -> projection is the identity
    ok = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    assert torch.allclose(pcgrad_coefficients(ok @ ok.T, fixed_orders(2)), torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6])
def test_equals_torchjd_pcgrad(n: int) -> None:
    from torchjd.aggregation import PCGrad

    m = conflicting(n, 30, seed=10 + n).float()
    torch.manual_seed(123)
    expected = PCGrad()(m)
    torch.manual_seed(123)
    orders = random_orders(n)  # drawn from the global generator exactly as torchjd draws them
    out, _ = gp_aggregate(m, config=PLAIN_SUM, orders=orders)
    assert torch.allclose(out, expected, atol=1e-5)


def test_attention_weights_follow_cosines() -> None:
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    history = torch.tensor([1.0, 0.0], dtype=torch.float64)
    norms = m.norm(dim=1)
    w = attention_weights(norms, m @ history, float(history.norm()), temperature=1.0)
    assert w[0] > w[1] > w[2]
    assert torch.isclose(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    same = attention_weights(torch.ones(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64), 1.0,
                             temperature=1.0)
    assert torch.allclose(same, torch.ones(3, dtype=torch.float64))
    sharper = attention_weights(norms, m @ history, 1.0, temperature=0.1)
    assert sharper[0] / sharper[2] > w[0] / w[2]
    with pytest.raises(ConfigError):
        attention_weights(norms, m @ history, 1.0, temperature=0.0)


def test_attention_changes_the_aggregate_and_first_step_is_plain() -> None:
    m = conflicting(4, 20, seed=3)
    orders = fixed_orders(4)
    cfg = AggregationConfig()
    first, stats0 = gp_aggregate(m, config=cfg, orders=orders)
    plain, _ = gp_aggregate(m, config=AggregationConfig(attention="none"), orders=orders)
    assert torch.allclose(first, plain)
    assert stats0.attention_weights == (1.0, 1.0, 1.0, 1.0)
    history = m[0].clone()
    later, stats = gp_aggregate(m, config=cfg, history=history, orders=orders)
    assert not torch.allclose(later, plain)
    assert len(set(round(w, 6) for w in stats.attention_weights)) > 1


def test_mean_method_is_plain_mean_and_no_conflict_is_mean() -> None:
    m = conflicting(5, 12, seed=2)
    out, stats = gp_aggregate(m, config=AggregationConfig(method="mean", attention="none"))
    assert torch.allclose(out, m.mean(0))
    assert stats.conflict_fraction > 0
    aligned = torch.rand(4, 9, dtype=torch.float64) + 0.1  # all positive -> no conflicts
    gp, stats2 = gp_aggregate(aligned, config=AggregationConfig(attention="none"))
    assert torch.allclose(gp, aligned.mean(0))
    assert stats2.conflict_fraction == 0.0


def test_per_layer_equals_blockwise_projection() -> None:
    m = conflicting(4, 30, seed=5)
    segments = [10, 5, 15]
    orders = random_orders(4, torch.Generator().manual_seed(0))
    cfg = AggregationConfig(attention="none", granularity="layer")
    out, _ = gp_aggregate(m, config=cfg, segments=segments, orders=orders)
    blocks = torch.split(m, segments, dim=1)
    expected = torch.cat([gp_aggregate(b, config=AggregationConfig(attention="none"), orders=orders)[0]
                          for b in blocks])
    assert torch.allclose(out, expected, atol=1e-10)
    whole, _ = gp_aggregate(m, config=AggregationConfig(attention="none"), orders=orders)
    assert not torch.allclose(out, whole)


def test_modified_reference_matches_sequential() -> None:
    m = conflicting(4, 16, seed=8)
    orders = random_orders(4, torch.Generator().manual_seed(2))
    cfg = AggregationConfig(attention="none", reference="modified", combine="sum")
    out, _ = gp_aggregate(m, config=cfg, orders=orders)
    assert torch.allclose(out, sequential_reference(m, orders, modified=True).sum(0), atol=1e-10)


def test_combine_and_stats() -> None:
    m = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    _, stats = gp_aggregate(m, config=AggregationConfig(attention="none"))
    assert stats.conflict_fraction == pytest.approx(1 / 3)
    assert cosine_matrix(m)[0, 1] == pytest.approx(-1.0)
    sizes = torch.tensor([1.0, 1.0, 2.0])
    out, _ = gp_aggregate(m, config=AggregationConfig(method="mean", attention="none", combine="size_weighted"),
                          sizes=sizes)
    assert torch.allclose(out, torch.tensor([0.0, 0.5], dtype=torch.float64))
    clipped, cstats = gp_aggregate(m * 10, config=AggregationConfig(attention="none", clip_norm=0.1))
    assert float(clipped.norm()) == pytest.approx(0.1)
    assert cstats.clipped


def test_aggregator_history_and_determinism() -> None:
    m = conflicting(4, 25, seed=9).float()
    a, b = GPAggregator(seed=1), GPAggregator(seed=1)
    out_a, _ = a(m, step=3)
    out_b, _ = b(m, step=3)
    assert torch.equal(out_a, out_b)
    assert a.history is not None and torch.equal(a.history, out_a)
    ema = GPAggregator(AggregationConfig(history="ema", ema_beta=0.5))
    first, _ = ema(m, step=0)
    second, _ = ema(m * 2, step=1)
    assert ema.history is not None and torch.allclose(ema.history, 0.5 * first + 0.5 * second)
    state = ema.state_tensors()
    fresh = GPAggregator(AggregationConfig(history="ema", ema_beta=0.5))
    fresh.load_state_tensors(state)
    assert fresh.history is not None and torch.equal(fresh.history, ema.history)


def test_torchjd_peers() -> None:
    m = conflicting(3, 10, seed=4).float()
    out, stats = GPAggregator(AggregationConfig(method="mgda"))(m)
    assert out.shape == (10,) and torch.isfinite(out).all()
    assert stats.num_clients == 3
    jd, _ = GPAggregator(AggregationConfig(method="torchjd_pcgrad"))(m, step=0)
    assert jd.shape == (10,)
    if importlib.util.find_spec("qpsolvers") is None:
        with pytest.raises(ConfigError, match="optional dependency"):
            GPAggregator(AggregationConfig(method="upgrad"))


def test_bad_inputs() -> None:
    with pytest.raises(ShapeError):
        gp_aggregate(torch.ones(5))
    with pytest.raises(ShapeError):
        gp_aggregate(torch.ones(0, 4))
    with pytest.raises(ShapeError, match="history"):
        gp_aggregate(torch.ones(2, 4), history=torch.ones(3))
    with pytest.raises(ConfigError, match="method"):
        AggregationConfig(method="bogus")
    with pytest.raises(ConfigError, match="size_weighted"):
        gp_aggregate(torch.ones(2, 4), config=AggregationConfig(combine="size_weighted"))
    with pytest.raises(ShapeError, match="segments"):
        gp_aggregate(torch.randn(2, 4), config=AggregationConfig(granularity="layer"), segments=[1, 2])


@pytest.mark.parametrize("cfg", [AggregationConfig(), AggregationConfig(method="mean"),
                                 AggregationConfig(granularity="layer", combine="sum")])
def test_reported_norm_matches_output(cfg: AggregationConfig) -> None:
    m = conflicting(5, 30, seed=6)
    out, stats = gp_aggregate(m, config=cfg, history=m[2], segments=[10, 20])
    assert stats.norm_after == pytest.approx(float(out.norm()), rel=1e-9)
    assert stats.norm_of_mean_before == pytest.approx(float(m.mean(0).norm()), rel=1e-9)


def test_norm_balance_makes_direction_scale_free() -> None:
    m = conflicting(4, 20, seed=11)
    scaled = m * torch.tensor([1000.0, 1.0, 0.01, 5.0], dtype=torch.float64)[:, None]
    orders = fixed_orders(4)
    cfg = AggregationConfig(attention="none", balance="norm")
    a, _ = gp_aggregate(m / m.norm(dim=1, keepdim=True), config=cfg, orders=orders)
    b, _ = gp_aggregate(scaled, config=cfg, orders=orders)
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) == pytest.approx(1.0, abs=1e-9)
    plain, _ = gp_aggregate(scaled, config=AggregationConfig(attention="none"), orders=orders)
    assert float(torch.nn.functional.cosine_similarity(a, plain, dim=0)) < 0.99


def test_gram_matrix_is_accurate_over_millions_of_columns():
    # float32 entries near 1: one float32 matmul over 2M columns drifts; chunks summed in float64 must not
    gen = torch.Generator().manual_seed(0)
    matrix = 1 + 0.1 * torch.randn(3, 2_000_000, generator=gen)
    vector = torch.randn(2_000_000, generator=gen)
    gram, cross = gram_matrix(matrix, vector)
    exact = (matrix.double() @ matrix.double().T).numpy()
    exact_cross = (matrix.double() @ vector.double()).numpy()
    assert np.abs(gram - exact).max() / np.abs(exact).max() < 1e-6
    assert cross is not None and np.abs(cross - exact_cross).max() / np.abs(exact_cross).max() < 1e-4
    assert gram_matrix(matrix)[1] is None
