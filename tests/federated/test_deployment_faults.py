"""A SuperNode killed by PID mid-run on the deployment engine: the SuperLink's "node unavailable" replies become
transient faults with their true reason (not "timeout after ..."), checkpoints are skipped (never aborted),
every fault is in metrics.json, and the surviving client and the server model finish (opt-in, minutes).

Run with PLURIBUS_FLOWER_DEPLOYMENT=1 .venv/bin/pytest tests/federated/test_deployment_faults.py -m ray
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pluribus.federated import FedBoneConfig, ModelConfig

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                       reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1"),
]
HARD_LIMIT_S = 900


def supernode_pid(partition: int) -> int | None:
    """The PID of the SuperNode this test process started for ``partition`` (a child of ours, found by PID)."""
    import psutil

    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "flower-supernode" in cmd and f"partition-id={partition} " in cmd + " ":
            return int(child.pid)
    return None


def test_killed_supernode_is_an_unavailable_fault(tmp_path: Path) -> None:
    from pluribus.federated.flower.run import run_fedbone_flower
    from pluribus.io import read_json

    # timeout_s above the SuperLink's heartbeat patience (2 x 30 s), so its reply arrives before our timeout
    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=5, batch_size=8,
                        max_train_per_client=32, timeout_s=150.0, checkpoint_every=1,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    run_dir = tmp_path / "run"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_fedbone_flower(cfg, engine="deployment", run_dir=run_dir,
                                                   timeout_s=HARD_LIMIT_S - 60, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed: int | None = None
    deadline = time.monotonic() + HARD_LIMIT_S
    first_ckpt = run_dir / "checkpoints" / "flower_server.safetensors"
    try:
        while thread.is_alive() and time.monotonic() < deadline and killed is None:
            if first_ckpt.exists():  # step 1 committed: both clients were alive; now kill client 1's SuperNode
                killed = supernode_pid(1)
                if killed is not None:
                    os.killpg(killed, signal.SIGKILL)  # its session: the SuperNode and its ClientApp process
            time.sleep(0.5)
        thread.join(max(1.0, deadline - time.monotonic()))
    finally:
        pid = supernode_pid(1)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
    assert killed is not None, outcome.get("error")
    assert not thread.is_alive(), "the deployment run did not finish within the hard limit"
    assert "error" not in outcome, outcome.get("error")
    metrics = read_json(run_dir / "metrics.json")["result"]
    log = metrics["fault_log"]
    mine = [r for r in log if r["client"] == 1]
    assert mine and all(r["client"] == 1 for r in log)  # client 0 never faulted
    assert any(r["kind"] == "unavailable" and "Node Unavailable" in r["reason"] for r in mine), mine
    flower = read_json(run_dir / "flower_result.json")
    assert flower["checkpoints_skipped"], "checkpoints after the kill must be skipped, not committed"
    assert "0:digit" in flower["final"] and isinstance(flower["final"]["0:digit"], dict)
    import torch

    res = outcome["result"]
    assert all(torch.isfinite(p).all() for p in res.general_model.parameters())
