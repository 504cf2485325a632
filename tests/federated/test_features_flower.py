"""The file-backed feature suite (``suite="features"``) and ``run_fedbone_flower`` on every engine."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pluribus.data.synthetic import make_synthetic_users
from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.federated import FedBoneConfig, ModelConfig, run_fedbone
from pluribus.federated.studies.tasks import (
    build_suite,
    client_tasks_from_features,
    load_feature_suite,
    save_feature_suite,
)

TASKS = ("price_sensitive", "segment", "early_adopter")
TINY = ModelConfig(dim=16, depth=1, heads=2, adapter_hidden=16)


@pytest.fixture(scope="module")
def users() -> tuple[object, torch.Tensor]:
    ds = make_synthetic_users(90, seed=3)
    # some users without a label: they must be dropped from that client in both paths
    ds.labels.loc[ds.labels.index[::7], "price_sensitive"] = np.nan
    ds.labels.loc[ds.labels.index[::5], "segment"] = np.nan
    tokens = torch.randn(ds.n_users, 3, 5, generator=torch.Generator().manual_seed(0))
    return ds, tokens


def _write(tmp_path: Path, users: tuple[object, torch.Tensor], seed: int = 2, tasks: tuple[str, ...] = TASKS) -> Path:
    ds, tokens = users
    return save_feature_suite(tmp_path / "feats.safetensors", tokens, ds, tasks, seed=seed)


def _same_tasks(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ta, tb in zip(a, b, strict=True):
        for field in ("name", "kind", "input_kind", "num_outputs", "primary_metric", "lower_is_better"):
            assert getattr(ta, field) == getattr(tb, field), field
        for field in ("x_train", "y_train", "x_test", "y_test"):
            va, vb = getattr(ta, field), getattr(tb, field)
            assert va.dtype == vb.dtype and torch.equal(va, vb), field


def test_feature_suite_roundtrip(tmp_path: Path, users: tuple[object, torch.Tensor]) -> None:
    ds, tokens = users
    path = _write(tmp_path, users)
    suite = load_feature_suite(path)
    assert torch.equal(suite.tokens, tokens) and suite.tokens.dtype == torch.float32
    assert suite.seed == 2 and suite.test_fraction == 0.2
    assert suite.num_classes == {"price_sensitive": 2, "segment": 3, "early_adopter": 2}
    assert suite.kinds["segment"] == "multiclass"
    mask, values = ds.label_array("price_sensitive")  # type: ignore[attr-defined]
    assert (suite.labels["price_sensitive"] == -1).sum() == (~mask).sum() > 0
    assert np.array_equal(suite.labels["price_sensitive"][mask], values)


@pytest.mark.parametrize("tasks", [TASKS, ("segment", "early_adopter"), ("early_adopter", "early_adopter")])
def test_features_suite_equals_client_tasks_from_features(tmp_path: Path, users: tuple[object, torch.Tensor],
                                                          tasks: tuple[str, ...]) -> None:
    ds, tokens = users
    path = _write(tmp_path, users)
    direct = client_tasks_from_features(tokens, ds, tasks, seed=2, max_train_per_client=20)
    loaded = build_suite("features", tasks, seed=2, max_train_per_client=20, features_path=path)
    _same_tasks(direct, loaded)
    # the split is disjoint in users and drops the unlabelled ones
    assert sum(t.num_train + len(t.y_test) for t in loaded) <= ds.n_users  # type: ignore[attr-defined]


def test_features_config_and_bad_input(tmp_path: Path, users: tuple[object, torch.Tensor]) -> None:
    ds, tokens = users
    # the config never checks or opens the data (a server builds it too, and holds none): where they are read
    FedBoneConfig(suite="features", tasks=TASKS)
    missing = FedBoneConfig(suite="features", tasks=TASKS, features_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(DataError, match="not found"):
        build_suite(missing.suite, missing.tasks, features_path=missing.features_path)
    path = _write(tmp_path, users, tasks=("segment", "early_adopter"))
    cfg = FedBoneConfig(suite="features", tasks=("segment", "price_sensitive"), seed=2, features_path=str(path))
    with pytest.raises(DataError, match="no task 'price_sensitive'"):
        build_suite(cfg.suite, cfg.tasks, seed=2, features_path=cfg.features_path)
    with pytest.raises(ConfigError, match="seed 5 differs"):
        build_suite("features", ("segment",), seed=5, features_path=path)
    with pytest.raises(ConfigError, match="test_fraction"):
        build_suite("features", ("segment",), seed=2, test_fraction=0.3, features_path=path)
    with pytest.raises(ConfigError, match="features_path"):
        build_suite("features", ("segment",), seed=2)
    with pytest.raises(ShapeError):
        save_feature_suite(tmp_path / "bad.safetensors", tokens[:, 0], ds, TASKS, seed=0)
    with pytest.raises(DataError):  # an unknown task of the UserDataset
        save_feature_suite(tmp_path / "bad.safetensors", tokens, ds, ("nope",), seed=0)
    # a file with a label tensor removed, and a file that is not a feature suite
    from safetensors import safe_open

    from pluribus.io import load_tensors, save_tensors

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_tensors(path)
    del tensors["label.segment"]
    broken = save_tensors(tmp_path / "broken.safetensors", tensors, metadata=meta)
    with pytest.raises(DataError, match="label of task 'segment' is missing"):
        load_feature_suite(broken)
    plain = save_tensors(tmp_path / "plain.safetensors", {"tokens": tokens})
    with pytest.raises(DataError, match="fedbone"):
        load_feature_suite(plain)
    bad_meta = save_tensors(tmp_path / "meta.safetensors", tensors, metadata={"fedbone": json.dumps({"tasks": 1})})
    with pytest.raises(DataError, match="malformed"):
        load_feature_suite(bad_meta)


def test_run_fedbone_flower_inprocess_equals_direct(tmp_path: Path, users: tuple[object, torch.Tensor]) -> None:
    from pluribus.federated import run_fedbone_flower

    ds, tokens = users
    path = _write(tmp_path, users)
    cfg = FedBoneConfig(suite="features", tasks=TASKS, steps=3, batch_size=8, seed=2, features_path=str(path),
                        model=TINY)
    clients = client_tasks_from_features(tokens, ds, TASKS, seed=2)
    direct = run_fedbone(replace(cfg, suite="custom", features_path=""), tasks=clients, progress=False)
    flower = run_fedbone_flower(cfg, engine="inprocess")
    assert flower.final == direct.final
    assert set(flower.final) == {"0:price_sensitive", "1:segment", "2:early_adopter"}
    assert flower.primary(clients) == direct.primary(clients)
    assert flower.bytes == direct.bytes and flower.bytes["per_step_train"] > 0
    assert flower.mean_conflict_fraction == direct.mean_conflict_fraction
    assert flower.faults == 0 and flower.steps_done == cfg.steps and flower.tasks == list(TASKS)
    assert flower.general_model is not None and direct.general_model is not None
    for (name, a), (_, b) in zip(flower.general_model.state_dict().items(),
                                 direct.general_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_run_fedbone_flower_bad_input() -> None:
    from pluribus.federated import run_fedbone_flower

    cfg = FedBoneConfig(suite="digits", tasks=("digit",), steps=1, model=TINY)
    with pytest.raises(ConfigError, match="engine"):
        run_fedbone_flower(cfg, engine="ray")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="save_feature_suite"):
        run_fedbone_flower(replace(cfg, suite="custom", tasks=("a",)))
    with pytest.raises(ConfigError, match="FedBone only"):
        run_fedbone_flower(replace(cfg, algorithm="local"))
    with pytest.raises(ConfigError, match="timeout_s"):
        run_fedbone_flower(cfg, timeout_s=0)
    with pytest.raises(ConfigError, match="poll_s"):
        run_fedbone_flower(cfg, poll_s=-1)
    with pytest.raises(ConfigError, match="num_cpus"):
        run_fedbone_flower(cfg, engine="simulation", num_cpus=0)


def test_run_fedbone_flower_run_folder_guards(tmp_path: Path) -> None:
    from pluribus.federated import run_fedbone_flower

    cfg = FedBoneConfig(suite="digits", tasks=("digit",), steps=1, batch_size=8, max_train_per_client=16,
                        model=TINY)
    first = run_fedbone_flower(cfg, run_dir=tmp_path / "run", progress=False)
    assert first.resumed_from is None and first.run_dir == str((tmp_path / "run").resolve())
    with pytest.raises(ConfigError, match="already holds a run"):
        run_fedbone_flower(cfg, run_dir=tmp_path / "run", resume=False)
    # checked before any engine process starts
    with pytest.raises(ConfigError, match="different config"):
        run_fedbone_flower(replace(cfg, steps=2), engine="deployment", run_dir=tmp_path / "run")


def _engine_check(tmp_path: Path, users: tuple[object, torch.Tensor], engine: str, timeout_s: float) -> None:
    from pluribus.federated import run_fedbone_flower

    path = _write(tmp_path, users)
    cfg = FedBoneConfig(suite="features", tasks=TASKS[:2], steps=2, batch_size=8, seed=2, timeout_s=120.0,
                        features_path=str(path), model=TINY)
    res = run_fedbone_flower(cfg, engine=engine, timeout_s=timeout_s)  # type: ignore[arg-type]
    ref = run_fedbone_flower(cfg, engine="inprocess")
    assert set(res.final) == {"0:price_sensitive", "1:segment"}
    assert res.faults <= 1  # under heavy load a Ray actor can miss the reply timeout: it is then left out
    if res.faults == 0:  # the same messages in the same order: the same numbers as in-process
        assert res.final == ref.final
        assert res.bytes["by_category"] == ref.bytes["by_category"]
    assert res.bytes["per_step_train"] > 0 and res.general_model is not None


@pytest.mark.ray
@pytest.mark.slow
def test_run_fedbone_flower_simulation(tmp_path: Path, users: tuple[object, torch.Tensor]) -> None:
    _engine_check(tmp_path, users, "simulation", timeout_s=240)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                    reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1")
def test_run_fedbone_flower_deployment(tmp_path: Path, users: tuple[object, torch.Tensor]) -> None:
    _engine_check(tmp_path, users, "deployment", timeout_s=480)
