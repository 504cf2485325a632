"""In-process FedBone loop: bytes, privacy boundary, faults, quarantine, bad input, checkpoint/resume, baselines."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pluribus.errors import ConfigError, ShapeError
from pluribus.federated import FedBoneConfig, ModelConfig, run_fedbone
from pluribus.federated.core.protocol import MSG_HEAD, Payload
from pluribus.federated.core.runtime import FedBoneClient
from pluribus.federated.studies.simulate import FedBoneSimulation
from pluribus.federated.studies.tasks import build_suite

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", steps=3, batch_size=8, max_train_per_client=64, model=TINY)


@pytest.fixture(scope="module")
def tasks():
    return build_suite(CFG.suite, CFG.tasks, seed=0, max_train_per_client=64)


def server_params(sim: FedBoneSimulation) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sim.server.model.state_dict().items()}


def test_step_runs_and_counts_bytes(tasks) -> None:
    sim = FedBoneSimulation(CFG, tasks)
    log = sim.step()
    assert log.participants == [0, 1, 2, 3] and not log.faults and not log.quarantined
    assert log.stats is not None and log.stats.num_clients == 4
    assert all(torch.isfinite(torch.tensor(v)) for v in log.losses.values())
    tokens = 4 * 4  # 8x8 digits, patch 2 -> 16 tokens
    per_client = 1 * 8 * tokens * 16 * 4  # K * B * T * D * fp32
    cats = sim.meter.by_category
    for name in ("train.embeddings", "train.features", "train.feature_grads"):
        assert cats[name] == 4 * per_client
    assert "train.embedding_grads" not in cats  # message 4 rides on the next request
    sim.step()
    assert cats["train.embedding_grads"] == 4 * per_client


def test_only_split_tensors_leave_clients(tasks) -> None:
    seen: set[str] = set()

    def spy(client: int, message_type: str, reply: Payload) -> Payload:
        seen.update(reply.tensors)
        assert not set(reply.scalars) & {"y", "label", "x"}
        return reply

    res = run_fedbone(CFG, tasks=tasks, tamper=spy, progress=False)
    assert seen == {"z", "df"}
    assert set(res.final) == {"0:digit", "1:parity", "2:segmentation", "3:reconstruction"}
    assert {"accuracy", "miou", "rmse"} <= {m for v in res.final.values() for m in v}


def test_deterministic(tasks) -> None:
    a = run_fedbone(CFG, tasks=tasks, progress=False)
    b = run_fedbone(CFG, tasks=tasks, progress=False)
    assert a.final == b.final


def test_training_reduces_loss(tasks) -> None:
    sim = FedBoneSimulation(replace(CFG, steps=20, server_lr=3e-3, client_lr=3e-3), tasks)
    first = sim.evaluate()
    for _ in range(20):
        sim.step()
    last = sim.evaluate()
    assert sum(v["loss"] for v in last.values()) < sum(v["loss"] for v in first.values())


def test_faults_are_left_out_and_logged(tasks) -> None:
    sim = FedBoneSimulation(replace(CFG, fault_rate=0.4), tasks)
    logs = [sim.step() for _ in range(6)]
    assert sum(len(lg.faults) for lg in logs) > 0
    assert all("injected failure" in r for lg in logs for r in lg.faults.values())
    for lg in logs:
        assert set(lg.participants).isdisjoint(lg.faults)
    assert all(torch.isfinite(v).all() for v in server_params(sim).values())


def test_non_finite_gradient_is_quarantined(tasks) -> None:
    def poison(client: int, message_type: str, reply: Payload) -> Payload:
        if client == 1 and message_type == MSG_HEAD:
            return Payload({"df": torch.full_like(reply.tensors["df"], float("nan"))}, reply.scalars)
        return reply

    sim = FedBoneSimulation(CFG, tasks, tamper=poison)
    clean = FedBoneSimulation(CFG, tasks)
    log = sim.step()
    assert log.quarantined == {1: "non-finite feature gradient"}
    assert log.participants == [0, 2, 3] and log.stats is not None and log.stats.num_clients == 3
    after = server_params(sim)
    assert all(torch.isfinite(v).all() for v in after.values())
    clean.step()
    assert not torch.equal(after["norm.weight"], server_params(clean)["norm.weight"])
    # the aggregate is exactly the one of the three healthy clients
    three = FedBoneSimulation(CFG, tasks)
    three.clients = {k: three.clients[k] for k in (0, 2, 3)}
    three.transport.clients = three.clients
    three.step()
    for k, v in server_params(three).items():
        assert torch.allclose(v, after[k]), k


def test_feature_shape_mismatch_is_clear_and_harmless(tasks) -> None:
    sim = FedBoneSimulation(CFG, tasks)
    wrong = replace(CFG, model=replace(TINY, dim=8, heads=2))
    sim.clients[2] = FedBoneClient(tasks[2], wrong, 2)
    sim.transport.clients = sim.clients
    before = server_params(sim)
    with pytest.raises(ShapeError, match=r"client 2 embeddings.*\[1, B, T, 16\]"):
        sim.step()
    for k, v in server_params(sim).items():
        assert torch.equal(v, before[k])


def test_bad_configs() -> None:
    with pytest.raises(ConfigError, match="at least one client"):
        FedBoneConfig(tasks=())
    with pytest.raises(ConfigError, match="unknown task 'bogus'"):
        FedBoneConfig(tasks=("digit", "bogus"))
    with pytest.raises(ConfigError, match="suite"):
        FedBoneConfig(suite="cifar", tasks=("digit",))
    with pytest.raises(ConfigError, match="algorithm"):
        FedBoneConfig(algorithm="fedmagic")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(dim=10, heads=4)


def test_checkpoint_resume_is_exact(tmp_path, tasks) -> None:
    cfg = replace(CFG, steps=4, checkpoint_every=2, eval_every=2)
    full = run_fedbone(cfg, tasks=tasks, run_dir=tmp_path / "full", progress=False)
    calls = {"n": 0}

    def crash(client: int, message_type: str, reply: Payload) -> Payload:
        calls["n"] += 1
        if calls["n"] > 4 * 2 * 3:  # dies during step 3 (after the step-2 checkpoint)
            raise RuntimeError("simulated crash")
        return reply

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fedbone(cfg, tasks=tasks, run_dir=tmp_path / "resumed", tamper=crash, progress=False)
    resumed = run_fedbone(cfg, tasks=tasks, run_dir=tmp_path / "resumed", progress=False)
    assert resumed.final == full.final
    assert resumed.bytes["total"] == full.bytes["total"]
    assert (tmp_path / "resumed" / "report.md").exists() and (tmp_path / "resumed" / "test_loss.png").exists()
    assert [c["step"] for c in resumed.curve] == [2, 4]
    assert (tmp_path / "resumed" / "steps" / "train.done").exists()
    with pytest.raises(ConfigError, match="different config"):
        run_fedbone(replace(cfg, steps=5), tasks=tasks, run_dir=tmp_path / "resumed", progress=False)


def test_local_steps_and_ablations(tasks) -> None:
    from pluribus.federated.core.config import AggregationConfig

    cfg = replace(CFG, steps=2, local_steps=2)
    res = run_fedbone(cfg, tasks=tasks, progress=False)
    assert res.steps_done == 2 and res.bytes["by_category"]["train.embeddings"] == 2 * 4 * (2 * 8 * 16 * 16 * 4)
    for agg in (AggregationConfig(method="mean"), AggregationConfig(attention="none"),
                AggregationConfig(granularity="layer", order="fixed", reference="modified")):
        out = run_fedbone(replace(CFG, aggregation=agg), tasks=tasks, progress=False)
        assert set(out.final) == set(res.final)


@pytest.mark.parametrize("algorithm", ["local", "fedavg", "fedprox", "fedper", "fedrep"])
def test_baselines_run(algorithm: str, tasks) -> None:
    res = run_fedbone(replace(CFG, algorithm=algorithm, steps=4, round_steps=2), tasks=tasks, progress=False)
    assert set(res.final) == {"0:digit", "1:parity", "2:segmentation", "3:reconstruction"}
    assert (res.bytes["total"] == 0) == (algorithm == "local")


def test_custom_suite_from_user_features_and_custom_backbone(synthetic) -> None:
    from torch import nn

    from pluribus.federated.studies.tasks import client_tasks_from_features

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(synthetic.n_users, 4, 8, generator=gen)
    names = ("price_sensitive", "segment")
    tasks = client_tasks_from_features(feats, synthetic, names, seed=0)
    assert [t.kind for t in tasks] == ["binary", "multiclass"] and tasks[1].num_outputs == 3
    cfg = FedBoneConfig(suite="custom", tasks=names, steps=2, batch_size=8, model=TINY)
    backbone = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    before = backbone[0].weight.detach().clone()
    res = run_fedbone(cfg, tasks=tasks, general_model=backbone, progress=False)
    assert set(res.final) == {"0:price_sensitive", "1:segment"} and "accuracy" in res.final["1:segment"]
    assert res.general_model is backbone and not torch.equal(backbone[0].weight, before)
    with pytest.raises(ShapeError, match="client feature tokens"):
        client_tasks_from_features(feats[:5], synthetic, names)
    with pytest.raises(ConfigError, match="custom"):
        run_fedbone(cfg, progress=False)
    with pytest.raises(ConfigError, match="1 client tasks given for 2"):
        run_fedbone(cfg, tasks=tasks[:1], progress=False)
