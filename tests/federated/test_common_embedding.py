"""A common frozen embedding (the setting where backbone gradients can conflict) and the per-step conflict
statistics the aggregation records."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pluribus.errors import ConfigError
from pluribus.federated import (
    FedBoneConfig,
    FedBoneSimulation,
    ModelConfig,
    build_suite,
    gp_aggregate,
    run_fedbone,
)
from pluribus.federated.core.config import AggregationConfig


def _cfg(**kw) -> FedBoneConfig:
    model = ModelConfig(dim=16, depth=1, heads=2, adapter_hidden=16, common_embedding="frozen")
    return FedBoneConfig(suite="digits", tasks=("digit", "parity", "segmentation"), steps=6, batch_size=16,
                         model=model, **kw)


def test_every_client_reads_through_the_same_frozen_embedding() -> None:
    cfg = _cfg()
    sim = FedBoneSimulation(cfg)
    embeds = [c.model.embed.state_dict() for c in sim.clients.values()]
    before = {k: v.clone() for k, v in embeds[0].items()}
    for other in embeds[1:]:
        assert all(torch.equal(other[k], before[k]) for k in before)
    for _ in range(3):
        sim.exchange()
    assert all(torch.equal(sim.clients[0].model.embed.state_dict()[k], before[k]) for k in before)  # never trained
    other_seed = FedBoneSimulation(replace(cfg, seed=1)).clients[0].model.embed.state_dict()
    assert not all(torch.equal(other_seed[k], before[k]) for k in before)  # each run its own draw


def test_own_embeddings_differ_per_client_and_train() -> None:
    cfg = replace(_cfg(), model=replace(_cfg().model, common_embedding="none"))
    sim = FedBoneSimulation(cfg)
    a, b = (sim.clients[k].model.embed.proj.weight.detach().clone() for k in (0, 1))
    assert not torch.equal(a, b)
    sim.exchange()
    sim.exchange()  # the first step's embedding gradient rides on the second step's request
    assert not torch.equal(sim.clients[0].model.embed.proj.weight, a)


def test_baselines_run_with_a_common_embedding() -> None:
    res = run_fedbone(replace(_cfg(), algorithm="fedavg"), progress=False)
    assert set(res.final) == {"0:digit", "1:parity", "2:segmentation"}


def test_clients_with_other_input_shapes_cannot_share_an_embedding() -> None:
    tasks = build_suite("digits", ("digit", "parity"), seed=0)
    tasks[1].x_train = tasks[1].x_train[:, :, :4, :4]
    with pytest.raises(ConfigError, match="common_embedding='frozen' needs every client's inputs of one kind and shape"):
        FedBoneSimulation(replace(_cfg(), tasks=("digit", "parity")), tasks)
    with pytest.raises(ConfigError, match="model.common_embedding must be one of"):
        ModelConfig(common_embedding="shared")


def test_aggregation_records_pair_cosines_norms_and_the_change_from_the_mean() -> None:
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.1, 0.0], [0.0, 0.0, 0.2]])
    out, stats = gp_aggregate(g, config=AggregationConfig(attention="none", order="fixed"))
    cos = g @ g.T / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    assert stats.pair_cosines == pytest.approx([float(cos[0, 1]), float(cos[0, 2]), float(cos[1, 2])])
    assert stats.client_norms == pytest.approx([float(n) for n in g.norm(dim=1)])
    mean = g.mean(0)
    assert stats.change_vs_mean == pytest.approx(float((out - mean).norm() / mean.norm()))
    assert stats.change_vs_mean > 0.1  # the opposed pair was projected: the aggregate moved
    _, plain = gp_aggregate(g, config=AggregationConfig(method="mean", attention="none"))
    assert plain.change_vs_mean == pytest.approx(0.0, abs=1e-7) and plain.cosine_vs_mean == pytest.approx(1.0)
    assert set(stats.as_dict()) >= {"pair_cosines", "client_norms", "change_vs_mean", "cosine_vs_mean"}
    assert np.isfinite(stats.cosine_vs_mean)


def test_a_run_reports_its_conflict_statistics_in_metrics_and_report(tmp_path) -> None:
    import json

    res = run_fedbone(_cfg(), run_dir=tmp_path / "run", progress=False)
    assert set(res.conflict) == {"median |cos| of client pairs", "median client norm ratio", "median change vs mean",
                                 "mean conflict fraction"}
    assert 0 <= res.conflict["median |cos| of client pairs"] <= 1 and res.conflict["median client norm ratio"] >= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["result"]
    assert metrics["conflict"] == pytest.approx(res.conflict)
    assert "median |cos| of client pairs" in (tmp_path / "run" / "report.md").read_text()
    again = run_fedbone(_cfg(), run_dir=tmp_path / "run", progress=False)  # a finished run folder reopened
    assert again.conflict == pytest.approx(res.conflict)


@pytest.mark.parametrize("cfg, segments", [
    (AggregationConfig(), None), (AggregationConfig(granularity="layer"), [300, 700]),
    (AggregationConfig(method="mean", balance="norm"), None), (AggregationConfig(method="upgrad"), None)])
def test_the_change_against_the_mean_equals_the_direct_computation(cfg, segments) -> None:
    from pluribus.federated import GPAggregator

    torch.manual_seed(0)
    g = torch.randn(5, 1000, dtype=torch.float64)
    agg = GPAggregator(cfg)
    agg(torch.randn(5, 1000, dtype=torch.float64), segments=segments)  # a history for the attention
    out, stats = agg(g, step=1, segments=segments)
    mean = g.mean(0)
    assert stats.change_vs_mean == pytest.approx(float((out - mean).norm() / mean.norm()), rel=1e-9)
    assert stats.cosine_vs_mean == pytest.approx(float(out @ mean / (out.norm() * mean.norm())), rel=1e-9)
