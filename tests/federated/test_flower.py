"""Flower apps: in-process Grid equals direct calls; timeouts and client errors are left out; Ray engine run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pluribus.config import flatten_config
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.core.protocol import MSG_HEAD
from pluribus.federated.studies.simulate import FedBoneSimulation

TINY = ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16)
CFG = FedBoneConfig(suite="digits", steps=3, batch_size=8, max_train_per_client=64, model=TINY)


def test_flower_inprocess_equals_direct() -> None:
    from pluribus.federated.flower.server_app import run_flower_inprocess

    sim = FedBoneSimulation(CFG)
    for _ in range(CFG.steps):
        sim.step()
    direct = sim.evaluate()
    flower = run_flower_inprocess(CFG)
    assert flower["final"] == direct
    state = sim.server.state_tensors()
    for k, v in state.items():
        assert torch.equal(v, flower["server_state"][k]), k
    assert flower["bytes"]["by_category"] == dict(sim.meter.by_category)
    assert flower["record_bytes"] >= flower["bytes"]["total"]
    assert len(flower["step_times"]) == CFG.steps


def test_flower_timeout_and_client_error_are_left_out() -> None:
    from pluribus.federated.flower.server_app import run_flower_inprocess
    from pluribus.flower_engines import in_process_node_id

    res = run_flower_inprocess(CFG, drop=lambda node, mtype: node == in_process_node_id(1) and mtype == MSG_HEAD)
    assert res["faults"] == CFG.steps  # client 1 times out in every step's head exchange
    assert set(res["final"]) == {"0:digit", "1:parity", "2:segmentation", "3:reconstruction"}
    assert all(torch.isfinite(v).all() for v in res["server_state"].values())


def test_client_app_error_becomes_fault() -> None:
    from flwr.app import Context, RecordDict

    from pluribus.federated.core.protocol import Fault, Payload
    from pluribus.federated.flower.client_app import make_client_app
    from pluribus.federated.flower.server_app import GridTransport
    from pluribus.flower_engines import InProcessGrid, in_process_node_id

    grid = InProcessGrid(make_client_app(CFG), CFG.num_clients)
    transport = GridTransport(grid, {c: in_process_node_id(c) for c in range(CFG.num_clients)}, timeout_s=1.0)
    # a head message before any embedding: the client raises ShapeError -> error reply -> Fault
    out = transport.call(MSG_HEAD, {0: Payload({"f": torch.zeros(1, 8, 16, 16)})}, step=0)
    assert isinstance(out[0], Fault) and "ShapeError" in out[0].reason
    ctx = Context(run_id=1, node_id=9, node_config={}, state=RecordDict(), run_config={})
    from pluribus.errors import ConfigError
    from pluribus.federated.flower.node import client_index

    with pytest.raises(ConfigError, match="partition-id"):
        client_index(ctx, 4)


def test_config_roundtrip_through_run_config() -> None:
    from flwr.app import Context, RecordDict

    from pluribus.federated.flower.client_app import config_from_context

    cfg = replace(CFG, tasks=("digit", "parity"), steps=7)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=flatten_config(cfg))
    assert config_from_context(ctx) == cfg


SIM_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from flwr.simulation import run_simulation
    from pluribus.federated import FedBoneConfig, ModelConfig
    from pluribus.federated.flower.client_app import make_client_app
    from pluribus.federated.flower.server_app import make_server_app
    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=2, batch_size=8,
                        max_train_per_client=32, timeout_s=150.0,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    out = []
    run_simulation(server_app=make_server_app(cfg, on_result=out.append), client_app=make_client_app(cfg),
                   num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1},
                                                     "init_args": {"num_cpus": 2, "include_dashboard": False}})
    res = out[0]
    print("RESULT " + json.dumps({"final": res["final"], "faults": res["faults"], "bytes": res["bytes"]["total"]}))
""")


@pytest.mark.ray
@pytest.mark.slow
def test_simulation_engine_ray(tmp_path: Path) -> None:
    env = {**os.environ, "PLURIBUS_PROGRESS": "0", "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"}
    script = tmp_path / "sim.py"
    script.write_text(SIM_SCRIPT)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("Flower simulation engine did not finish within 240 s (is loopback up?)")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(lines[-1][7:])
    assert set(res["final"]) == {"0:digit", "1:segmentation"}
    assert res["bytes"] > 0
    # under heavy machine load a Ray actor can miss the 150 s reply timeout: it is then left out (a logged fault)
    assert res["faults"] <= 1
