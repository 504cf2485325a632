"""One entry for FedBone over Flower: ``run_fedbone_flower(config, engine=...)`` returns the same ``RunResult``
as ``run_fedbone``.

- ``inprocess``: the ServerApp and ClientApps over ``InProcessGrid`` in this process (bit-identical to
  ``run_fedbone`` for the same config);
- ``simulation``: Flower's simulation engine (Ray) in a child process with a hard timeout;
- ``deployment``: a SuperLink and one SuperNode per client on loopback plus ``flwr run``, each in its own
  process session, all stopped when the run ends or the timeout passes.

Every client builds its data from the config, so custom per-user features travel as ``suite="features"`` (a
file from ``tasks.save_feature_suite``; its path is made absolute here for the child processes).

With ``run_dir`` every engine keeps the server's resumable run folder there and the clients keep their own
checkpoints under ``client_state_root`` (default ``<run_dir>/clients``; one ``partition-<K>`` folder per client:
the deployment engine passes it to each SuperNode as its ``state-dir`` node config); rerunning the same call
resumes from the last checkpoint (``config.checkpoint_every``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.config import FedBoneConfig
from pluribus.federated.simulate import RunResult

Engine = Literal["inprocess", "simulation", "deployment"]
ENGINES = ("inprocess", "simulation", "deployment")


@dataclass
class FlowerRunResult(RunResult):
    """``RunResult`` plus what the Flower path measures: per-step server times of this process's steps, the
    step it resumed from (None: fresh), serialized record bytes and the run folder."""

    step_times: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    record_bytes: int = 0
    run_dir: str | None = None


def run_fedbone_flower(
    config: FedBoneConfig, *, engine: Engine = "inprocess", timeout_s: float = 600,
    run_dir: str | Path | None = None, resume: bool = True, client_state_root: str | Path | None = None,
    progress: bool = True, num_cpus: int | None = None, poll_s: float = 0.1,
) -> FlowerRunResult:
    """Train FedBone through its Flower ServerApp/ClientApp on the chosen engine; a ``RunResult`` like
    ``run_fedbone``'s (``general_model`` is the trained server model), resumable with ``run_dir``. The object is
    a ``FlowerRunResult`` (adds per-step server times, ``resumed_from``, record bytes, the run folder).

    ``num_cpus``: CPUs for Ray (simulation; default min(clients, cores)). ``poll_s``: how often the server polls
    the SuperLink for replies in deployment (0 = Flower's send_and_receive, 3 s); the deployment engine also sets
    the SuperExec's task poll interval to it. ``progress``: a progress bar over steps (in-process engine).
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown {engine!r}; known: {list(ENGINES)}")
    if config.algorithm != "fedbone":
        raise ConfigError("the Flower apps run FedBone only; run baselines with run_fedbone")
    if config.suite == "custom":
        raise ConfigError("suite 'custom' has no data a Flower client can load: write the features with "
                          "save_feature_suite(...) and use suite='features', features_path=<file>")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
    if poll_s < 0:
        raise ConfigError(f"poll_s must be >= 0, got {poll_s}")
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"num_cpus must be >= 1, got {num_cpus}")
    if config.features_path:
        config = replace(config, features_path=str(Path(config.features_path).resolve()))
    run_path = None if run_dir is None else Path(run_dir).resolve()
    if run_path is not None and client_state_root is None:
        client_state_root = run_path / "clients"
    state_root = None if client_state_root is None else Path(client_state_root).resolve()
    if run_path is not None and engine != "inprocess":  # the ServerApp runs elsewhere: check the folder here
        from pluribus.runs import RunFolder

        RunFolder(run_path, config, resume=resume)  # ConfigError if it holds another config (or resume=False)
    start = time.perf_counter()
    if engine == "inprocess":
        from pluribus.federated.server_app import run_flower_inprocess

        res = run_flower_inprocess(config, run_dir=run_path, resume=resume, client_state_root=state_root,
                                   progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="fedbone-flower-") as tmp:
            opts = _Options(run_dir=run_path, client_state_root=state_root, num_cpus=num_cpus, poll_s=poll_s)
            run = _run_simulation if engine == "simulation" else _run_deployment
            res = run(config, Path(tmp), timeout_s, opts)
    return _to_result(config, res, time.perf_counter() - start, run_path)


@dataclass(frozen=True)
class _Options:
    run_dir: Path | None = None
    client_state_root: Path | None = None
    num_cpus: int | None = None
    poll_s: float = 0.1


def _to_result(config: FedBoneConfig, res: dict[str, Any], wall_s: float, run_dir: Path | None) -> FlowerRunResult:
    from pluribus.federated.runtime import FedBoneServer

    final = {k: v for k, v in res["final"].items() if isinstance(v, dict)}
    server = FedBoneServer(config)
    server.load_state_tensors(res["server_state"])
    conflict = res.get("mean_conflict_fraction", float("nan"))
    return FlowerRunResult(
        config=config, tasks=list(config.tasks), final=final,
        curve=res.get("curve") or [{"step": config.steps, "metrics": res["final"]}], bytes=res["bytes"],
        faults=int(res["faults"]), quarantined=int(res["quarantined"]),
        mean_conflict_fraction=float("nan") if conflict is None else float(conflict),
        wall_s=wall_s, steps_done=int(res.get("steps_done", len(res["step_times"]))), general_model=server.model,
        step_times=[float(t) for t in res["step_times"]], resumed_from=res.get("resumed_from"),
        record_bytes=int(res.get("record_bytes", 0)), run_dir=None if run_dir is None else str(run_dir))


def _child_env(poll_s: float = 0.0) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PLURIBUS_PROGRESS": "0",
           "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if poll_s > 0:  # how often flower-superexec looks for a task to start (Flower's default: 1 s)
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(poll_s, 0.01))
    return env


def _finished_since(out: Path, since_ns: int) -> bool:
    from pluribus.federated.server_app import RESULT_FILE

    path = out / RESULT_FILE
    try:
        return path.stat().st_mtime_ns >= since_ns
    except OSError:
        return False


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


def _run_simulation(config: FedBoneConfig, tmp: Path, timeout_s: float, opts: _Options) -> dict[str, Any]:
    from pluribus.config import config_to_dict
    from pluribus.io import write_json

    cfg_path, log = tmp / "config.json", tmp / "simulation.log"
    out = opts.run_dir if opts.run_dir is not None else tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, config_to_dict(config))
    cmd = [sys.executable, "-m", "pluribus.federated.flower_run", "simulation", str(cfg_path), str(out)]
    if opts.run_dir is not None:
        cmd += ["--run-dir", str(opts.run_dir)]
    if opts.client_state_root is not None:
        cmd += ["--client-state-root", str(opts.client_state_root)]
    if opts.num_cpus is not None:
        cmd += ["--num-cpus", str(opts.num_cpus)]
    since = time.time_ns()
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
    if not _finished_since(out, since):
        raise PluribusError(f"the Flower simulation ended without a result in {out}; log tail:\n{_tail(log)}")
    return _read_result(out, _tail(log))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_deployment(config: FedBoneConfig, tmp: Path, timeout_s: float, opts: _Options) -> dict[str, Any]:
    from pluribus.federated.server_app import write_flower_app

    app_dir, home = tmp / "app", tmp / "flwr"
    out = opts.run_dir if opts.run_dir is not None else tmp / "out"
    state_root = opts.client_state_root if opts.client_state_root is not None else tmp / "clients"
    for d in (app_dir, home, out):
        d.mkdir(parents=True, exist_ok=True)
    write_flower_app(app_dir, config, run_dir=out, poll_s=opts.poll_s)
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**_child_env(opts.poll_s), "FLWR_HOME": str(home)}
    since = time.time_ns()
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
            node_config = (f'partition-id={k} num-partitions={config.num_clients} '
                           f'state-dir="{state_root / f"partition-{k}"}"')
            start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port",
                   str(_free_port()), "--node-config", node_config], f"supernode{k}.log")
        runner = start(["flwr", "run", str(app_dir), "loop", "--stream"], "flwr_run.log")
        while time.monotonic() < deadline and not _finished_since(out, since):
            if runner.poll() is not None:  # `flwr run --stream` returns when the run ends, failed or not
                grace = min(deadline, time.monotonic() + 10)
                while time.monotonic() < grace and not _finished_since(out, since):
                    time.sleep(0.2)
                if not _finished_since(out, since):
                    raise PluribusError(f"`flwr run` ended (exit {runner.returncode}) without a result; log tail:\n"
                                        f"{_tail(tmp / 'flwr_run.log', 6000)}")
                break
            time.sleep(0.2)
        if not _finished_since(out, since):
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


def _simulation_main(config_path: str, out_dir: str, run_dir: str | None = None,
                     client_state_root: str | None = None, num_cpus: int | None = None) -> None:
    """Child-process body of the simulation engine: run Flower's Ray simulation, write result and server state."""
    from flwr.simulation import run_simulation

    from pluribus.config import config_from_dict
    from pluribus.federated.client_app import make_client_app
    from pluribus.federated.server_app import RESULT_FILE, SERVER_STATE_FILE, make_server_app
    from pluribus.io import read_json, save_tensors, write_json

    torch.set_num_threads(1)
    config = config_from_dict(FedBoneConfig, read_json(config_path), source=config_path)
    results: list[dict[str, Any]] = []
    num_cpus = num_cpus or max(1, min(config.num_clients, os.cpu_count() or 1))
    run_simulation(server_app=make_server_app(config, on_result=results.append, run_dir=run_dir),
                   client_app=make_client_app(config, state_root=client_state_root),
                   num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": num_cpus, "include_dashboard": False}})
    if not results:
        raise SystemExit("the Flower simulation ended without a result (see the Flower log above)")
    res = results[0]
    if run_dir is None:  # with a run folder the ServerApp wrote both already
        save_tensors(Path(out_dir) / SERVER_STATE_FILE, res["server_state"])
        write_json(Path(out_dir) / RESULT_FILE, {k: v for k, v in res.items() if k != "server_state"})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pluribus.federated.flower_run")
    parser.add_argument("engine", choices=["simulation"])
    parser.add_argument("config_json")
    parser.add_argument("out_dir")
    parser.add_argument("--run-dir")
    parser.add_argument("--client-state-root")
    parser.add_argument("--num-cpus", type=int)
    ns = parser.parse_args()
    _simulation_main(ns.config_json, ns.out_dir, ns.run_dir, ns.client_state_root, ns.num_cpus)
