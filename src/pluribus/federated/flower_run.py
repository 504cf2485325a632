"""One entry for FedBone over Flower: ``run_fedbone_flower(config, engine=...)`` returns the same ``RunResult``
as ``run_fedbone``.

- ``inprocess``: the ServerApp and ClientApps over ``InProcessGrid`` in this process (bit-identical to
  ``run_fedbone`` for the same config);
- ``simulation``: Flower's simulation engine (Ray) in a child process with a hard timeout;
- ``deployment``: a SuperLink and one SuperNode per client on loopback plus ``flwr run``, each in its own
  process session, all stopped when the run ends or the timeout passes.

Every client builds its data from the config, so custom per-user features travel as ``suite="features"`` (a
file from ``tasks.save_feature_suite``; its path is made absolute here for the child processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.config import FedBoneConfig
from pluribus.federated.simulate import RunResult

Engine = Literal["inprocess", "simulation", "deployment"]
ENGINES = ("inprocess", "simulation", "deployment")


def run_fedbone_flower(config: FedBoneConfig, *, engine: Engine = "inprocess", timeout_s: float = 600) -> RunResult:
    """Train FedBone through its Flower ServerApp/ClientApp on the chosen engine; a ``RunResult`` like
    ``run_fedbone``'s (``general_model`` is the trained server model)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown {engine!r}; known: {list(ENGINES)}")
    if config.algorithm != "fedbone":
        raise ConfigError("the Flower apps run FedBone only; run baselines with run_fedbone")
    if config.suite == "custom":
        raise ConfigError("suite 'custom' has no data a Flower client can load: write the features with "
                          "save_feature_suite(...) and use suite='features', features_path=<file>")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
    if config.features_path:
        config = replace(config, features_path=str(Path(config.features_path).resolve()))
    start = time.perf_counter()
    if engine == "inprocess":
        from pluribus.federated.server_app import run_flower_inprocess

        res = run_flower_inprocess(config)
    else:
        with tempfile.TemporaryDirectory(prefix="fedbone-flower-") as tmp:
            run = _run_simulation if engine == "simulation" else _run_deployment
            res = run(config, Path(tmp), timeout_s)
    return _to_result(config, res, time.perf_counter() - start)


def _to_result(config: FedBoneConfig, res: dict[str, Any], wall_s: float) -> RunResult:
    from pluribus.federated.runtime import FedBoneServer

    final = {k: v for k, v in res["final"].items() if isinstance(v, dict)}
    server = FedBoneServer(config)
    server.load_state_tensors(res["server_state"])
    conflict = res.get("mean_conflict_fraction", float("nan"))
    return RunResult(config=config, tasks=list(config.tasks), final=final,
                     curve=[{"step": config.steps, "metrics": res["final"]}], bytes=res["bytes"],
                     faults=int(res["faults"]), quarantined=int(res["quarantined"]),
                     mean_conflict_fraction=float("nan") if conflict is None else float(conflict),
                     wall_s=wall_s, steps_done=len(res["step_times"]), general_model=server.model)


def _child_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PLURIBUS_PROGRESS": "0",
            "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _read_result(out: Path, log_tail: str) -> dict[str, Any]:
    from pluribus.federated.server_app import RESULT_FILE, SERVER_STATE_FILE
    from pluribus.io import load_tensors, read_json

    if not (out / RESULT_FILE).exists():
        raise PluribusError(f"the Flower run ended without a result in {out}; log tail:\n{log_tail}")
    res = dict(read_json(out / RESULT_FILE))
    res["server_state"] = load_tensors(out / SERVER_STATE_FILE)
    return res


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes started in their own sessions: SIGTERM each session, then SIGKILL after 15 s."""
    for p in procs:  # each was started in its own session: stop that session's processes only
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _run_simulation(config: FedBoneConfig, tmp: Path, timeout_s: float) -> dict[str, Any]:
    from pluribus.config import config_to_dict
    from pluribus.io import write_json

    cfg_path, out, log = tmp / "config.json", tmp / "out", tmp / "simulation.log"
    out.mkdir()
    write_json(cfg_path, config_to_dict(config))
    cmd = [sys.executable, "-m", "pluribus.federated.flower_run", "simulation", str(cfg_path), str(out)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(),
                                          start_new_session=True))
        try:
            procs[0].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PluribusError(f"the Flower simulation engine did not finish within {timeout_s} s; log tail:\n"
                                f"{_tail(log)}") from None
    finally:
        stop_processes(procs)
    return _read_result(out, _tail(log))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_deployment(config: FedBoneConfig, tmp: Path, timeout_s: float) -> dict[str, Any]:
    from pluribus.federated.server_app import RESULT_FILE, write_flower_app

    app_dir, home, out = tmp / "app", tmp / "flwr", tmp / "out"
    for d in (app_dir, home, out):
        d.mkdir()
    write_flower_app(app_dir, config, run_dir=out)
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**_child_env(), "FLWR_HOME": str(home)}
    deadline = time.monotonic() + timeout_s
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(tmp / log, "wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        start(["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(link)],
              "superlink.log")
        _wait_port(link, deadline, tmp / "superlink.log")
        for k in range(config.num_clients):
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                   str(_free_port()), "--node-config", f"partition-id={k} num-partitions={config.num_clients}"],
                  f"supernode{k}.log")
        runner = start(["flwr", "run", str(app_dir), "loop", "--stream"], "flwr_run.log")
        while time.monotonic() < deadline and not (out / RESULT_FILE).exists():
            if runner.poll() is not None and runner.returncode != 0:
                raise PluribusError(f"`flwr run` failed (exit {runner.returncode}):\n{_tail(tmp / 'flwr_run.log')}")
            time.sleep(0.5)
        if not (out / RESULT_FILE).exists():
            raise PluribusError(f"the Flower deployment engine did not finish within {timeout_s} s; flwr run log:\n"
                                f"{_tail(tmp / 'flwr_run.log')}")
        time.sleep(1.0)  # the ServerApp writes the server state before the result file; let the write settle
    finally:
        stop_processes(procs)
    return _read_result(out, _tail(tmp / "flwr_run.log"))


def _wait_port(port: int, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise PluribusError(f"the SuperLink did not listen on 127.0.0.1:{port} in time; log:\n{_tail(log)}")


def _simulation_main(config_path: str, out_dir: str) -> None:
    """Child-process body of the simulation engine: run Flower's Ray simulation, write result and server state."""
    from flwr.simulation import run_simulation

    from pluribus.config import config_from_dict
    from pluribus.federated.client_app import make_client_app
    from pluribus.federated.server_app import RESULT_FILE, SERVER_STATE_FILE, make_server_app
    from pluribus.io import read_json, save_tensors, write_json

    torch.set_num_threads(1)
    config = config_from_dict(FedBoneConfig, read_json(config_path), source=config_path)
    results: list[dict[str, Any]] = []
    num_cpus = max(1, min(config.num_clients, os.cpu_count() or 1))
    run_simulation(server_app=make_server_app(config, on_result=results.append), client_app=make_client_app(config),
                   num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": num_cpus, "include_dashboard": False}})
    if not results:
        raise SystemExit("the Flower simulation ended without a result (see the Flower log above)")
    res = results[0]
    save_tensors(Path(out_dir) / SERVER_STATE_FILE, res["server_state"])
    write_json(Path(out_dir) / RESULT_FILE, {k: v for k, v in res.items() if k != "server_state"})


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "simulation":
        raise SystemExit("usage: python -m pluribus.federated.flower_run simulation CONFIG.json OUT_DIR")
    _simulation_main(sys.argv[2], sys.argv[3])
