"""`pluribus fed flower --superlink`: FedBone submitted to a SuperLink that already runs (TLS, SuperNode
authentication, one node per client joined with its own state folder), on loopback, equals the in-process
engine tensor for tensor. Opt-in (PLURIBUS_FLOWER_DEPLOYMENT=1, `-m ray`): every message starts a fresh
`flwr-clientapp` process. The built-in digits suite (each client builds its own share) is used: FedBone clients
that read their institution's own data file are issue 22 §1."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pluribus.cli import main
from pluribus.deploy.address import Address
from pluribus.deploy.certs import make_test_certificates, node_key_paths
from pluribus.deploy.host import register_node, start_superlink
from pluribus.deploy.join import start_supernode
from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.flower_engines import free_port, stop_processes

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                       reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1"),
]


def test_fedbone_submitted_over_tls_equals_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pluribus.config import save_config
    from pluribus.federated.flower.run import run_fedbone_flower

    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=2, batch_size=8,
                        max_train_per_client=32, timeout_s=120.0,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    config = save_config(cfg, tmp_path / "fedbone.toml")
    files = make_test_certificates(tmp_path / "certs", ["127.0.0.1"], nodes=["c0", "c1"])
    link = start_superlink(Address("127.0.0.1", free_port()), files, tmp_path / "superlink")
    procs = [link.process]
    try:
        for k in range(2):
            register_node(node_key_paths(tmp_path / "certs", f"c{k}").public, link.address, ca=files.ca,
                          home=tmp_path / "flwr")
            node = start_supernode(link.address, {"partition-id": k, "state-dir": str(tmp_path / f"client{k}")},
                                   tmp_path / f"client{k}", ca=files.ca,
                                   private_key=node_key_paths(tmp_path / "certs", f"c{k}").private)
            procs.append(node.process)
        assert main(["fed", "flower", "--config", str(config), "--superlink", str(link.address),
                     "--root-certificates", str(files.ca), "--out", str(tmp_path / "run"), "--timeout-s", "420"]) == 0
    finally:
        stop_processes(procs)
    printed = json.loads(capsys.readouterr().out)
    assert printed["faults"] == 0 and printed["steps_done"] == 2 and printed["engine"].startswith("deployment")
    ref = run_fedbone_flower(cfg, engine="inprocess", progress=False)
    from pluribus.federated.core.runtime import FedBoneServer
    from pluribus.federated.flower.server_app import SERVER_STATE_FILE
    from pluribus.io import load_tensors

    server = FedBoneServer(cfg)
    server.load_state_tensors(load_tensors(tmp_path / "run" / SERVER_STATE_FILE))
    got, want = server.model.state_dict(), ref.general_model.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
