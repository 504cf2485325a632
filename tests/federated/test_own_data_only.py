"""Each party holds only its own data (issue 22 §1): every FedBone client reads its institution's file from its own
node config, the ServerApp opens no data file at all, and a node with another institution's file, none, or a task
the server's config does not give it stops the run at the hello, before anything is trained or written."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message

from pluribus.data.synthetic import make_synthetic_users
from pluribus.errors import PluribusError
from pluribus.federated import FedBoneConfig, ModelConfig, run_fedbone
from pluribus.federated.flower import client_app as capp
from pluribus.federated.flower.client_app import make_client_app
from pluribus.federated.flower.server_app import run_flower_inprocess
from pluribus.federated.studies import tasks as suite_tasks
from pluribus.federated.studies.tasks import institution_file, save_feature_suite, save_institution_files
from pluribus.flower_engines import InProcessGrid, in_process_node_id

TASKS = ("price_sensitive", "segment", "early_adopter")
TINY = ModelConfig(dim=16, depth=1, heads=2, adapter_hidden=16)
SERVER = FedBoneConfig(suite="features", tasks=TASKS, steps=3, batch_size=8, seed=2, model=TINY, eval_every=0)


@pytest.fixture(scope="module")
def users() -> tuple[Any, torch.Tensor, np.ndarray]:
    ds = make_synthetic_users(90, seed=3)
    ds.labels.loc[ds.labels.index[::7], "price_sensitive"] = np.nan
    tokens = torch.randn(ds.n_users, 3, 5, generator=torch.Generator().manual_seed(0))
    partition = np.random.default_rng(1).integers(0, len(TASKS), size=ds.n_users)
    return ds, tokens, partition


def institutions(tmp_path: Path, users: tuple[Any, torch.Tensor, np.ndarray]) -> list[Path]:
    """Each institution's file in a folder of its own (as on its own host)."""
    ds, tokens, partition = users
    written = save_institution_files(tmp_path / "prepared", tokens, ds, TASKS, seed=2, partition=partition)
    own = []
    for k, f in enumerate(written):
        (tmp_path / f"host{k}").mkdir()
        own.append(Path(shutil.move(str(f), tmp_path / f"host{k}" / "mine.safetensors")))
    return own


class OnlyOwnFile:
    """A ClientApp wrapper that puts node K's file in place only while node K handles a message (elsewhere it is
    hidden), and records which file each load read and for whom: a read of another institution's file, or any
    read outside a client's handler (the server), finds nothing or is recorded."""

    def __init__(self, app: Any, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
        self.app, self.files = app, files
        self.hidden = [f.with_name(f.name + ".hidden") for f in files]
        for f, h in zip(files, self.hidden, strict=True):
            f.rename(h)
        self.current: int | None = None
        self.reads: list[tuple[int | None, Path]] = []
        real = suite_tasks.load_feature_suite

        def spy(path: str | Path) -> Any:
            self.reads.append((self.current, Path(path)))
            return real(path)
        monkeypatch.setattr(suite_tasks, "load_feature_suite", spy)

    def __call__(self, message: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        self.hidden[k].rename(self.files[k])
        self.current = k
        try:
            return self.app(message, context)
        finally:
            self.current = None
            self.files[k].rename(self.hidden[k])


def test_each_client_reads_only_its_own_file_and_the_server_none(
        tmp_path: Path, users: tuple[Any, torch.Tensor, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ds, tokens, partition = users
    files = institutions(tmp_path, users)
    capp._TASKS.clear()  # a fresh process: every client reads its file
    guard = OnlyOwnFile(make_client_app(SERVER), files, monkeypatch)
    grid = InProcessGrid(guard, len(TASKS), node_configs=[{"data-file": str(f)} for f in files])  # type: ignore[arg-type]
    res = run_flower_inprocess(SERVER, grid=grid)  # the server's config names no data file at all
    assert guard.reads and {k for k, _ in guard.reads} == {0, 1, 2}
    assert all(path == files[k] for k, path in guard.reads)  # each node read its own file, nobody else's
    # what the server learned of the clients' data: their hellos, nothing more
    assert res["clients"]["1"] == {"index": 1, "task": "segment", "kind": "multiclass", "input_kind": "tokens",
                                   "num_outputs": 3, "num_train": res["clients"]["1"]["num_train"],
                                   "num_test": res["clients"]["1"]["num_test"], "primary_metric": "accuracy",
                                   "lower_is_better": False}
    # and the run equals run_fedbone on one file of every institution with the same partition, tensor for tensor
    whole = save_feature_suite(tmp_path / "whole.safetensors", tokens, ds, TASKS, seed=2, partition=partition)
    direct = run_fedbone(replace(SERVER, features_path=str(whole)), progress=False)
    assert res["final"] == direct.final and res["bytes"]["by_category"] == direct.bytes["by_category"]
    assert direct.general_model is not None
    for name, value in direct.general_model.state_dict().items():
        assert torch.equal(res["server_state"][f"model.{name}"], value), name
    assert {int(c): v["num_train"] for c, v in res["clients"].items()} == {
        k: t.num_train for k, t in enumerate(suite_tasks.build_config_suite(replace(SERVER, features_path=str(whole))))}


def _refused(config: FedBoneConfig, node_configs: list[dict[str, Any]], run_dir: Path) -> str:
    capp._TASKS.clear()
    grid = InProcessGrid(make_client_app(config), config.num_clients, node_configs=node_configs)
    with pytest.raises(PluribusError) as err:
        run_flower_inprocess(config, grid=grid, run_dir=run_dir)
    assert not run_dir.exists()  # stopped at the hello: nothing written, the server model never trained
    return str(err.value)


def test_a_node_with_another_institutions_file_none_or_another_task_stops_the_run(
        tmp_path: Path, users: tuple[Any, torch.Tensor, np.ndarray]) -> None:
    ds, tokens, partition = users
    files = institutions(tmp_path, users)
    run_dir = tmp_path / "run"
    swapped = [{"data-file": str(files[0])}, {"data-file": str(files[0])}, {"data-file": str(files[2])}]
    msg = _refused(SERVER, swapped, run_dir)
    assert f"node {in_process_node_id(1)} failed the hello" in msg and "not client 1's" in msg and str(files[0]) in msg
    none = [{"data-file": str(files[0])}, {}, {"data-file": str(files[2])}]
    assert "client 1: node_config lacks 'data-file'" in _refused(SERVER, none, run_dir)
    whole = save_feature_suite(tmp_path / "whole.safetensors", tokens, ds, TASKS, seed=2, partition=partition)
    everyone = [{"data-file": str(f)} for f in files[:2]] + [{"data-file": str(whole)}]
    assert "holds the users of every institution" in _refused(SERVER, everyone, run_dir)
    # the server's config gives client 2 another task than the one its data hold
    other = replace(SERVER, tasks=("price_sensitive", "segment", "gender"))
    msg = _refused(other, [{"data-file": str(f)} for f in files], run_dir)
    assert "client 2 task 'gender'" in msg and "'early_adopter'" in msg
    assert "\n" not in msg.strip()


def test_a_single_file_still_runs_on_flower_each_client_reading_its_own_share(
        tmp_path: Path, users: tuple[Any, torch.Tensor, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    from pluribus.federated import run_fedbone_flower

    ds, tokens, partition = users
    whole = save_feature_suite(tmp_path / "whole.safetensors", tokens, ds, TASKS, seed=2, partition=partition)
    config = replace(SERVER, features_path=str(whole))
    reads: list[Path] = []
    real = suite_tasks.load_feature_suite
    monkeypatch.setattr(suite_tasks, "load_feature_suite", lambda p: reads.append(Path(p)) or real(p))
    capp._TASKS.clear()
    flower = run_fedbone_flower(config, progress=False)
    # the file of every institution is read once, to split it; each client reads only its own share
    assert reads.count(whole.resolve()) == 1 and len({p for p in reads if p != whole.resolve()}) == len(TASKS)
    assert all(p.name == institution_file(".", k).name for k, p in enumerate(sorted(set(reads) - {whole.resolve()})))
    direct = run_fedbone(config, progress=False)
    assert flower.final == direct.final
    # a Flower client handed that file itself refuses it, naming the way out
    with pytest.raises(PluribusError, match="holds the users of every institution.*split_feature_suite"):
        capp.build_own_task(config, 0, whole)
