"""Flower deployment engine on loopback: SuperLink + 2 SuperNodes + `flwr run` (opt-in, hard timeouts).

Every message starts a fresh `flwr-clientapp` process (Flower's subprocess isolation), which imports torch and
builds the client's data, so this takes minutes on a small machine: run it with PLURIBUS_FLOWER_DEPLOYMENT=1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pluribus.federated import FedBoneConfig, ModelConfig
from pluribus.federated.flower.run import stop_processes

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PLURIBUS_FLOWER_DEPLOYMENT") != "1",
                       reason="deployment engine test is opt-in: set PLURIBUS_FLOWER_DEPLOYMENT=1"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deployment_engine_loopback(tmp_path: Path) -> None:
    from pluribus.federated.flower.server_app import write_flower_app

    cfg = FedBoneConfig(suite="digits", tasks=("digit", "segmentation"), steps=1, batch_size=8,
                        max_train_per_client=32, timeout_s=120.0,
                        model=ModelConfig(dim=16, depth=1, heads=2, patch=2, adapter_hidden=16))
    app_dir, home, out = tmp_path / "app", tmp_path / "flwr", tmp_path / "out"
    app_dir.mkdir()
    home.mkdir()
    write_flower_app(app_dir, cfg, run_dir=out)
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PLURIBUS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(tmp_path / log, "w") as fh:
            procs.append(subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    try:
        start(["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(link)],
              "superlink.log")
        time.sleep(5)
        for k in range(cfg.num_clients):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
                   "--node-config", f"partition-id={k} num-partitions={cfg.num_clients}"], f"supernode{k}.log")
        run = subprocess.run(["flwr", "run", str(app_dir), "loop", "--stream"], env=env, capture_output=True,
                             text=True, timeout=420)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        deadline = time.monotonic() + 60
        while not (out / "flower_result.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        result = json.loads((out / "flower_result.json").read_text())
        assert set(result["final"]) == {"0:digit", "1:segmentation"}
        assert result["faults"] == 0 and result["bytes"]["total"] > 0
    finally:
        stop_processes(procs)
