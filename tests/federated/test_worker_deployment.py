"""Worker mode on the Flower deployment engine on loopback (opt-in: PLURIBUS_FLOWER_DEPLOYMENT=1, hard timeout).

Every SuperNode runs with node config worker="auto": its first message starts the client's worker, later ones
go through the thin ClientApp to it. The run must equal the in-process Grid bit for bit (checkpoints included);
the workers are stopped by the PIDs in their pid files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from pluribus.federated import FedBoneConfig, ModelConfig

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                       reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1"),
]


def test_worker_mode_on_the_deployment_engine_equals_inprocess() -> None:
    from pluribus.federated.flower.server_app import (
        RESULT_FILE,
        SERVER_STATE_FILE,
        run_flower_inprocess,
        write_flower_app,
    )
    from pluribus.federated.flower.worker_socket import running_pid, stop_worker
    from pluribus.flower_engines import run_deployment
    from pluribus.io import load_tensors, read_json

    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=4, batch_size=8,
                        max_train_per_client=32, timeout_s=120.0, checkpoint_every=2, eval_every=2,
                        micro_batches_per_message=2,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    work = Path(tempfile.mkdtemp(prefix="pwd-", dir="/tmp"))  # short: Unix socket paths hold ~104 bytes
    states = [work / "clients" / f"partition-{k}" for k in range(cfg.num_clients)]
    pids: list[int | None] = []
    try:
        write_flower_app(work / "app", cfg, run_dir=work / "out")
        nodes = [f'partition-id={k} num-partitions={cfg.num_clients} state-dir="{d}" worker="auto"'
                 for k, d in enumerate(states)]
        run_deployment(work / "app", work, nodes, work / "out" / RESULT_FILE, 600.0, poll_s=0.1)
        pids = [running_pid(d) for d in states]
        res = read_json(work / "out" / RESULT_FILE)
        state = load_tensors(work / "out" / SERVER_STATE_FILE)
    finally:
        for d in states:
            stop_worker(d)
    assert all(p is not None for p in pids), "each client's worker ran"
    assert all(running_pid(d) is None for d in states)
    assert all(any(d.glob("fedbone-client*-step0000004.safetensors")) for d in states)  # saved by the workers
    ref = run_flower_inprocess(cfg)
    assert res["faults"] == 0 and res["final"] == ref["final"] and res["bytes"] == ref["bytes"]
    for k, v in ref["server_state"].items():
        assert torch.equal(state[k], v), k
    shutil.rmtree(work, ignore_errors=True)


def test_run_fedbone_flower_with_workers_equals_inprocess() -> None:
    from pluribus.federated.flower.run import run_fedbone_flower
    from pluribus.federated.flower.worker_socket import running_pid

    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=2, batch_size=8,
                        max_train_per_client=32, timeout_s=120.0, micro_batches_per_message=2, eval_every=2,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    work = Path(tempfile.mkdtemp(prefix="pwr-", dir="/tmp"))
    try:
        res = run_fedbone_flower(cfg, engine="deployment", worker=True, client_state_root=work, timeout_s=600.0)
        assert all((work / f"partition-{k}" / "worker.log").exists() for k in range(cfg.num_clients))  # they ran
        assert all(running_pid(work / f"partition-{k}") is None for k in range(cfg.num_clients))  # stopped by PID
        ref = run_fedbone_flower(cfg, engine="inprocess", progress=False)
        assert res.final == ref.final
        for k, v in ref.general_model.state_dict().items():
            assert torch.equal(v, res.general_model.state_dict()[k]), k
    finally:
        shutil.rmtree(work, ignore_errors=True)
