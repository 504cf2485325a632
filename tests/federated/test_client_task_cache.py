"""A ClientApp builds only its own task, caches it in its state directory, reuses the cache and rebuilds it when
the data-relevant config changes (or the file is damaged)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.flower import client_app as capp
from pluribus.federated.studies.tasks import build_client_task, build_suite

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", tasks=("digit", "reconstruction"), steps=1, batch_size=8,
                    max_train_per_client=40, model=TINY)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every task build the ClientApp does, by client index; building all clients' tasks fails the test."""
    calls: list[int] = []
    real = capp.build_config_client_task

    def spy(config: FedBoneConfig, index: int):  # noqa: ANN202
        calls.append(index)
        return real(config, index)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a ClientApp built every client's task")

    monkeypatch.setattr(capp, "build_config_client_task", spy)
    monkeypatch.setattr("pluribus.federated.studies.tasks.build_config_suite", forbidden)
    capp._TASKS.clear()  # a fresh process
    yield calls
    capp._TASKS.clear()


def test_one_client_task_equals_the_suite_share() -> None:
    full = build_suite("digits", CFG.tasks, seed=3, max_train_per_client=40)
    for k in range(len(CFG.tasks)):
        one = build_client_task("digits", CFG.tasks, k, seed=3, max_train_per_client=40)
        assert one.name == full[k].name and one.kind == full[k].kind
        for f in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(one, f), getattr(full[k], f)), (k, f)


def test_client_builds_only_its_own_task_and_caches_it(tmp_path: Path, builds: list[int]) -> None:
    from pluribus.federated.flower.server_app import run_flower_inprocess

    root = tmp_path / "clients"
    first = run_flower_inprocess(CFG, client_state_root=root, run_dir=tmp_path / "run")
    assert sorted(builds) == [0, 1]  # each client once, its own task only
    for k in range(2):
        assert capp.task_cache_path(root / f"partition-{k}", k).is_file()

    builds.clear()
    capp._TASKS.clear()  # new processes (as every deployment message is): the cache files are read instead
    again = run_flower_inprocess(CFG, client_state_root=root, run_dir=tmp_path / "run2")
    assert builds == [] and again["final"] == first["final"]

    capp._TASKS.clear()
    changed = replace(CFG, max_train_per_client=24)  # a data-relevant change: the cache is stale
    assert capp.client_task(changed, 0, root / "partition-0").num_train == 24 and builds == [0]
    capp._TASKS.clear()
    assert capp.client_task(changed, 0, root / "partition-0").num_train == 24 and builds == [0]  # rewritten

    builds.clear()
    capp._TASKS.clear()
    capp.client_task(replace(CFG, steps=9, client_lr=0.5), 1, root / "partition-1")
    assert builds == []  # training options do not touch the data: the cache stays valid


def test_damaged_cache_is_rebuilt(tmp_path: Path, builds: list[int]) -> None:
    state = tmp_path / "partition-0"
    task = capp.client_task(CFG, 0, state)
    path = capp.task_cache_path(state, 0)
    path.write_bytes(b"not a safetensors file")
    capp._TASKS.clear()
    again = capp.client_task(CFG, 0, state)
    assert builds == [0, 0] and torch.equal(again.x_train, task.x_train)
    capp._TASKS.clear()
    assert torch.equal(capp.client_task(CFG, 0, state).y_test, task.y_test) and builds == [0, 0]  # repaired


def test_a_client_whose_data_does_not_build_fails_the_hello_clearly(tmp_path: Path) -> None:
    from pluribus.errors import PluribusError
    from pluribus.federated.flower.server_app import run_flower_inprocess

    missing = tmp_path / "features.safetensors"
    missing.write_bytes(b"x")  # exists (the config accepts it) but is not a feature suite
    cfg = FedBoneConfig(suite="features", tasks=("gender",), features_path=str(missing), steps=1, model=TINY)
    capp._TASKS.clear()
    with pytest.raises(PluribusError, match="failed the hello: .*features.safetensors"):
        run_flower_inprocess(cfg)
