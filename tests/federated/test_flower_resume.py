"""Checkpoint/resume on the Flower path: the server checkpoints only its state, each client its own.

A run interrupted after its step-2 checkpoint and resumed ends bit-identical to an uninterrupted one (the crash is
simulated the way the direct-path test does it: an exception in the middle of step 3).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pluribus.errors import DataError, PluribusError
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MSG_EMBED, MSG_HEAD
from pluribus.federated.flower.client_app import (
    CKPT_SAVE,
    client_checkpoint_path,
    load_client_checkpoint,
    make_client_app,
)
from pluribus.federated.flower.server_app import run_flower_inprocess
from pluribus.flower_engines import InProcessGrid

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", steps=4, batch_size=8, max_train_per_client=64, model=TINY,
                    checkpoint_every=2, eval_every=2)


def crash_after_checkpoint(message_type: str):  # noqa: ANN201
    """A drop hook that raises (a server crash) at the first ``message_type`` after the step-2 checkpoint."""
    seen = {"save": False}

    def hook(node: int, mtype: str) -> bool:
        if mtype == CKPT_SAVE:
            seen["save"] = True
        elif seen["save"] and mtype == message_type:
            raise RuntimeError("simulated crash")
        return False

    return hook


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("full")
    return run_flower_inprocess(CFG, run_dir=root / "server", client_state_root=root / "clients")


def assert_same_run(res: dict, full: dict) -> None:
    assert res["final"] == full["final"]
    assert res["curve"] == full["curve"]
    assert res["bytes"] == full["bytes"]
    assert res["faults"] == full["faults"] and res["mean_conflict_fraction"] == full["mean_conflict_fraction"]
    assert res["server_state"].keys() == full["server_state"].keys()
    for k, v in res["server_state"].items():
        assert torch.equal(v, full["server_state"][k]), k


def test_resume_after_crash_is_exact(tmp_path: Path, full: dict) -> None:
    server_dir, clients = tmp_path / "server", tmp_path / "clients"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_flower_inprocess(CFG, run_dir=server_dir, client_state_root=clients,
                             drop=crash_after_checkpoint(MSG_HEAD))
    # the server's checkpoint holds server state only; each client's file holds its own state
    from pluribus.io import load_tensors, read_json

    server_ckpt = load_tensors(server_dir / "checkpoints" / "flower_server.safetensors")
    assert server_ckpt and all(k.startswith(("server.", "pending.")) for k in server_ckpt)
    assert read_json(server_dir / "checkpoints" / "flower_server.json")["next_step"] == 2
    assert not (server_dir / RESULT).exists()
    for k in range(CFG.num_clients):
        assert client_checkpoint_path(clients / f"partition-{k}", k, 2).exists()
    # a fresh grid (new client processes: empty Context.state) resumes from the clients' own files
    resumed = run_flower_inprocess(CFG, run_dir=server_dir, client_state_root=clients)
    assert resumed["resumed_from"] == 2 and len(resumed["step_times"]) == 2
    assert_same_run(resumed, full)
    assert (server_dir / "report.md").exists() and (server_dir / "steps" / "train.done").exists()
    # only the newest checkpoint and the server's last committed one are kept per client
    assert sorted(p.name for p in (clients / "partition-0").iterdir()) == [
        "fedbone-client0-step0000002.safetensors", "fedbone-client0-step0000004.safetensors"]


RESULT = "flower_result.json"


def test_server_restart_with_live_clients(tmp_path: Path, full: dict) -> None:
    # the clients survive the server crash (same grid, same Context.state)
    grid = InProcessGrid(make_client_app(CFG), CFG.num_clients, state_root=tmp_path / "clients",
                         drop=crash_after_checkpoint(MSG_EMBED))
    with pytest.raises(RuntimeError):  # dies before step 3 reaches any client: their state is the checkpoint's
        run_flower_inprocess(CFG, run_dir=tmp_path / "a", grid=grid)
    grid.drop = None
    for p in (tmp_path / "clients").rglob("*.safetensors"):
        p.unlink()  # not needed: the clients answer from memory
    assert_same_run(run_flower_inprocess(CFG, run_dir=tmp_path / "a", grid=grid), full)

    grid = InProcessGrid(make_client_app(CFG), CFG.num_clients, state_root=tmp_path / "clients_b",
                         drop=crash_after_checkpoint(MSG_HEAD))
    with pytest.raises(RuntimeError):  # dies after step 3's embeddings: Context.state is stale, files are right
        run_flower_inprocess(CFG, run_dir=tmp_path / "b", grid=grid)
    grid.drop = None
    assert_same_run(run_flower_inprocess(CFG, run_dir=tmp_path / "b", grid=grid), full)


def test_missing_client_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    server_dir, clients = tmp_path / "server", tmp_path / "clients"
    with pytest.raises(RuntimeError):
        run_flower_inprocess(CFG, run_dir=server_dir, client_state_root=clients, drop=crash_after_checkpoint(MSG_HEAD))
    client_checkpoint_path(clients / "partition-1", 1, 2).unlink()
    with pytest.raises(PluribusError, match=r"resuming .* at step 2 failed: client 1: .*no checkpoint for step 2"):
        run_flower_inprocess(CFG, run_dir=server_dir, client_state_root=clients)
    # another run's (or another config's) checkpoint is refused by name
    with pytest.raises(DataError, match="another run: token"):
        load_client_checkpoint(clients / "partition-0", CFG, 0, 2, token="not-this-run")
    with pytest.raises(DataError, match="another run: config"):
        load_client_checkpoint(clients / "partition-0", replace(CFG, client_lr=0.5), 0, 2, token="x")


def test_client_without_state_dir_cannot_checkpoint(tmp_path: Path) -> None:
    grid = InProcessGrid(make_client_app(CFG), CFG.num_clients)  # no state-dir node config, no state root
    with pytest.raises(PluribusError, match="client checkpoints at step 2 failed: client 0: .*no state directory"):
        run_flower_inprocess(CFG, run_dir=tmp_path / "run", grid=grid)


def test_grid_transport_polls_until_replies_or_timeout() -> None:
    from pluribus.federated.core.protocol import Fault, Payload
    from pluribus.federated.flower.server_app import GridTransport
    from pluribus.flower_engines import in_process_node_id

    class LateGrid(InProcessGrid):
        synchronous = False  # replies show up on the second pull, as over a SuperLink
        pulls = 0

        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            self.pulls += 1
            return [] if self.pulls % 2 else super().pull_messages(message_ids)

    cfg = replace(CFG, tasks=("digit", "parity"))
    grid = LateGrid(make_client_app(cfg), 2, drop=lambda node, mtype: node == in_process_node_id(1))
    transport = GridTransport(grid, {c: in_process_node_id(c) for c in range(2)}, timeout_s=0.3, poll_s=0.01)
    out = transport.call(MSG_EMBED, {0: Payload(scalars={"step": 0}), 1: Payload(scalars={"step": 0})}, step=0)
    assert isinstance(out[0], Payload) and out[0].tensors["z"].shape[:2] == (1, 8)
    assert isinstance(out[1], Fault) and out[1].reason.startswith("timeout")
    assert grid.pulls >= 3


DEPLOYMENT_OPT_IN = pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                                       reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["simulation", pytest.param("deployment", marks=DEPLOYMENT_OPT_IN)])
def test_engine_resumes_a_checkpointed_run(tmp_path: Path, engine: str) -> None:
    """A run checkpointed after step 1 and crashed (in-process) resumes on the Ray or deployment engine: the
    server loads its own checkpoint and each client, started fresh (a Ray actor, or a SuperNode whose ClientApp
    process starts per message), restores its state from its own ``state-dir``; the result equals an
    uninterrupted run."""
    from pluribus.federated.flower.run import run_fedbone_flower

    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=2, batch_size=8,
                        max_train_per_client=32, timeout_s=150.0, checkpoint_every=1, model=TINY)
    full = run_flower_inprocess(cfg)
    run_dir, clients = tmp_path / "run", tmp_path / "clients"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_flower_inprocess(cfg, run_dir=run_dir, client_state_root=clients, drop=crash_after_checkpoint(MSG_HEAD))
    res = run_fedbone_flower(cfg, engine=engine, run_dir=run_dir, client_state_root=clients,  # type: ignore[arg-type]
                             timeout_s=480, progress=False)
    assert res.resumed_from == 1 and len(res.step_times) == 1
    assert res.faults <= 1  # under heavy load a client can miss the reply timeout: it is then left out
    if res.faults == 0:
        assert res.final == full["final"] and res.bytes["by_category"] == full["bytes"]["by_category"]
