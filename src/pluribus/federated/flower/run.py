"""One entry for FedBone over Flower: ``run_fedbone_flower(config, engine=...)`` returns the same ``RunResult``
as ``run_fedbone``.

- ``inprocess``: the ServerApp and ClientApps over ``InProcessGrid`` in this process (bit-identical to
  ``run_fedbone`` for the same config);
- ``simulation``: Flower's simulation engine (Ray) in a child process with a hard timeout;
- ``deployment``: a SuperLink and one SuperNode per client on loopback plus ``flwr run``, each in its own
  process session, all stopped when the run ends or the timeout passes.

Every client reads only its own data. For ``suite="features"`` each client gets its own institution's file as
its node's ``data-file`` (the deployment engine's ``--node-config``; the in-process and simulation engines'
app factory): ``data_files[K]`` when given, else ``<features_path>/client-<K>.safetensors`` for the folder that
``pluribus fed prepare`` writes, else the single ``save_feature_suite`` file of ``features_path`` is first split
into one file per client (``tasks.split_feature_suite``, in a temporary folder of this run) so that no client
reads another institution's rows. The ServerApp gets the config alone and opens none of these files. The
built-in suites build each client's share from the packaged data, as before.

With ``run_dir`` every engine keeps the server's resumable run folder there and the clients keep their own
checkpoints under ``client_state_root`` (default ``<run_dir>/clients``; one ``partition-<K>`` folder per client:
the deployment engine passes it to each SuperNode as its ``state-dir`` node config); rerunning the same call
resumes from the last checkpoint (``config.checkpoint_every``).

Starting and stopping the engines is :mod:`pluribus.flower_engines`, the layer PrivFusion's Flower apps use too.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from pluribus.errors import ConfigError, PluribusError
from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.studies.results import RunResult
from pluribus.flower_engines import run_child, run_deployment, simulate_apps, stop_processes, tail

__all__ = ["ENGINES", "Engine", "FlowerRunResult", "run_fedbone_flower", "stop_processes"]

Engine = Literal["inprocess", "simulation", "deployment"]
ENGINES = ("inprocess", "simulation", "deployment")


@dataclass
class FlowerRunResult(RunResult):
    """``RunResult`` plus what the Flower path measures: per-step server times of this process's steps, the
    step it resumed from (None: fresh), serialized record bytes and the run folder.

    Every field of :class:`~pluribus.federated.studies.results.RunResult`, and:

    Attributes:
        step_times: the server's time of each step this process ran, in seconds.
        resumed_from: the step the run resumed from (None: a fresh run).
        record_bytes: bytes of the serialized Flower records.
        run_dir: the run folder, or None.
    """

    step_times: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    record_bytes: int = 0
    run_dir: str | None = None


def run_fedbone_flower(
    config: FedBoneConfig, *, engine: Engine = "inprocess", timeout_s: float = 600,
    run_dir: str | Path | None = None, resume: bool = True, client_state_root: str | Path | None = None,
    progress: bool = True, num_cpus: int | None = None, poll_s: float = 0.1, worker: bool = False,
    data_files: Sequence[str | Path] | None = None,
) -> FlowerRunResult:
    """Train FedBone through its Flower ServerApp/ClientApp on the chosen engine; a ``RunResult`` like
    ``run_fedbone``'s (``general_model`` is the trained server model), resumable with ``run_dir``. The object is
    a ``FlowerRunResult`` (adds per-step server times, ``resumed_from``, record bytes, the run folder).

    ``num_cpus``: CPUs for Ray (simulation; default min(clients, cores)). ``poll_s``: how often the server polls
    the SuperLink for replies in deployment (0 = Flower's send_and_receive, 3 s); the deployment engine also sets
    the SuperExec's task poll interval to it. ``progress``: a progress bar over steps (in-process engine).
    ``worker`` (deployment only): each SuperNode's client runs in a long-lived worker process that its first
    message starts (``pluribus.federated.flower.worker``; stopped by PID when the run ends).
    ``data_files`` (suite 'features'): each client's own data file, one per client (see the module docstring for
    the default).

    Args:
        config: the FedBone settings.
        engine: ``inprocess``, ``simulation`` (Ray) or ``deployment`` (a local SuperLink and SuperNodes).
        timeout_s: how long the run may take.
        run_dir: the resumable run folder, or None.
        resume: resume ``run_dir`` if it holds an unfinished run.
        client_state_root: where each client keeps its state (default: inside the run folder or a temp folder).
        progress: see above.
        num_cpus: see above.
        poll_s: see above.
        worker: see above.
        data_files: see above.

    Raises:
        ConfigError: an unknown engine, ``worker`` off the deployment engine, a baseline algorithm, a suite a
            Flower client cannot load, bad timeouts or CPU counts, or ``data_files`` that do not fit the suite.
        PluribusError: the run ended without a result.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine: unknown {engine!r}; known: {list(ENGINES)}")
    if worker and engine != "deployment":
        raise ConfigError(f"worker: the long-lived client worker runs on the deployment engine, not {engine!r}")
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
    if data_files is not None:
        if config.suite != "features":
            raise ConfigError(f"data_files: per-client data files are for suite 'features', not {config.suite!r}")
        if len(data_files) != config.num_clients:
            raise ConfigError(f"data_files: {len(data_files)} files for {config.num_clients} clients (one each)")
        data_files = [Path(f).resolve() for f in data_files]
    run_path = None if run_dir is None else Path(run_dir).resolve()
    if run_path is not None and client_state_root is None:
        client_state_root = run_path / "clients"
    state_root = None if client_state_root is None else Path(client_state_root).resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedbone-flower-") as tmp:
        # a missing or wrong data file is refused here, before any run folder is written
        files = client_data_files(config, Path(tmp) / "clients") if data_files is None else [Path(f) for f in data_files]
        if run_path is not None and engine != "inprocess":  # the ServerApp runs elsewhere: check the folder here
            from pluribus.runs import RunFolder

            RunFolder(run_path, config, resume=resume)  # ConfigError if it holds another config (or resume=False)
        if engine == "inprocess":
            from pluribus.federated.flower.server_app import run_flower_inprocess

            res = run_flower_inprocess(config, run_dir=run_path, resume=resume, client_state_root=state_root,
                                       progress=progress, data_files=files)
        else:
            opts = _Options(run_dir=run_path, client_state_root=state_root, num_cpus=num_cpus, poll_s=poll_s,
                            worker=worker, data_files=files)
            run = _run_simulation if engine == "simulation" else _run_deployment
            res = run(config, Path(tmp), timeout_s, opts)
    return flower_run_result(config, res, time.perf_counter() - start, run_path)


def client_data_files(config: FedBoneConfig, scratch: Path) -> list[Path] | None:
    """Each client's own data file for ``config`` (None: a built-in suite, whose clients build their own share):
    the folder ``features_path``'s per-institution files, or a single feature-suite file split into ``scratch``
    (one file per client). A ``features_path`` that names neither is a ConfigError/DataError naming it."""
    if config.suite != "features":
        return None
    from pluribus.federated.studies.tasks import institution_file, split_feature_suite

    if not config.features_path:
        raise ConfigError("suite 'features' needs each client's own data file: pass data_files=[one per client], "
                          "or features_path (the folder pluribus fed prepare wrote)")
    source = Path(config.features_path)
    if source.is_dir():
        return [institution_file(source, k) for k in range(config.num_clients)]
    return split_feature_suite(source, config.tasks, scratch)


@dataclass(frozen=True)
class _Options:
    run_dir: Path | None = None
    client_state_root: Path | None = None
    num_cpus: int | None = None
    poll_s: float = 0.1
    worker: bool = False
    data_files: list[Path] | None = None


def flower_run_result(config: FedBoneConfig, res: dict[str, Any], wall_s: float, run_dir: Path | None) -> FlowerRunResult:
    """The ``FlowerRunResult`` of a finished Flower run's result record (``read_flower_result``)."""
    from pluribus.federated.core.runtime import FedBoneServer

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
        record_bytes=int(res.get("record_bytes", 0)), run_dir=None if run_dir is None else str(run_dir),
        fault_log=[dict(r) for r in res.get("fault_log", [])],
        interrupted_fault_log=[dict(r) for r in res.get("interrupted_fault_log", [])])


def read_flower_result(out: Path, log_tail: str) -> dict[str, Any]:
    """The ServerApp's result record and server state in ``out``; PluribusError with ``log_tail`` if absent."""
    from pluribus.federated.flower.server_app import RESULT_FILE, SERVER_STATE_FILE
    from pluribus.io import load_tensors, read_json

    if not (out / RESULT_FILE).exists():
        raise PluribusError(f"the Flower run ended without a result in {out}; log tail:\n{log_tail}")
    res = dict(read_json(out / RESULT_FILE))
    res["server_state"] = load_tensors(out / SERVER_STATE_FILE)
    return res


def _run_simulation(config: FedBoneConfig, tmp: Path, timeout_s: float, opts: _Options) -> dict[str, Any]:
    from pluribus.config import config_to_dict
    from pluribus.federated.flower.server_app import RESULT_FILE
    from pluribus.io import write_json

    cfg_path, log = tmp / "config.json", tmp / "simulation.log"
    out = opts.run_dir if opts.run_dir is not None else tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, config_to_dict(config))
    cmd = [sys.executable, "-m", "pluribus.federated.flower.run", "simulation", str(cfg_path), str(out)]
    if opts.run_dir is not None:
        cmd += ["--run-dir", str(opts.run_dir)]
    if opts.client_state_root is not None:
        cmd += ["--client-state-root", str(opts.client_state_root)]
    if opts.num_cpus is not None:
        cmd += ["--num-cpus", str(opts.num_cpus)]
    for data_file in opts.data_files or []:
        cmd += ["--data-file", str(data_file)]
    run_child(cmd, log, out / RESULT_FILE, timeout_s, what="the Flower simulation engine")
    return read_flower_result(out, tail(log))


def _run_deployment(config: FedBoneConfig, tmp: Path, timeout_s: float, opts: _Options) -> dict[str, Any]:
    from pluribus.federated.flower.server_app import RESULT_FILE, write_flower_app

    app_dir = tmp / "app"
    out = opts.run_dir if opts.run_dir is not None else tmp / "out"
    state_root = opts.client_state_root if opts.client_state_root is not None else tmp / "clients"
    for d in (app_dir, out):
        d.mkdir(parents=True, exist_ok=True)
    write_flower_app(app_dir, config, run_dir=out, poll_s=opts.poll_s)
    states = [state_root / f"partition-{k}" for k in range(config.num_clients)]
    worker = ' worker="auto"' if opts.worker else ""  # each client's first message starts its long-lived worker
    data = [f' data-file="{f}"' for f in opts.data_files] if opts.data_files else [""] * len(states)
    node_configs = [f'partition-id={k} num-partitions={config.num_clients} state-dir="{d}"{data[k]}{worker}'
                    for k, d in enumerate(states)]
    try:
        # the ServerApp writes the server state before the result file: run_deployment lets the write settle
        run_deployment(app_dir, tmp, node_configs, out / RESULT_FILE, timeout_s, poll_s=opts.poll_s)
    finally:
        if opts.worker:
            from pluribus.federated.flower.worker_socket import stop_worker

            for d in states:
                stop_worker(d)
    return read_flower_result(out, tail(tmp / "flwr_run.log"))


def _simulation_main(config_path: str, out_dir: str, run_dir: str | None = None,
                     client_state_root: str | None = None, num_cpus: int | None = None,
                     data_files: list[str] | None = None) -> None:
    """Child-process body of the simulation engine: run Flower's Ray simulation, write result and server state."""
    from pluribus.config import config_from_dict
    from pluribus.federated.flower.client_app import make_client_app
    from pluribus.federated.flower.server_app import RESULT_FILE, SERVER_STATE_FILE, make_server_app
    from pluribus.io import read_json, save_tensors, write_json

    torch.set_num_threads(1)
    config = config_from_dict(FedBoneConfig, read_json(config_path), source=config_path)
    results: list[dict[str, Any]] = []
    simulate_apps(make_server_app(config, on_result=results.append, run_dir=run_dir),
                  make_client_app(config, state_root=client_state_root, data_files=data_files or None),
                  config.num_clients, num_cpus=num_cpus)
    if not results:
        raise SystemExit("the Flower simulation ended without a result (see the Flower log above)")
    res = results[0]
    if run_dir is None:  # with a run folder the ServerApp wrote both already
        save_tensors(Path(out_dir) / SERVER_STATE_FILE, res["server_state"])
        write_json(Path(out_dir) / RESULT_FILE, {k: v for k, v in res.items() if k != "server_state"})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pluribus.federated.flower.run")
    parser.add_argument("engine", choices=["simulation"])
    parser.add_argument("config_json")
    parser.add_argument("out_dir")
    parser.add_argument("--run-dir")
    parser.add_argument("--client-state-root")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--data-file", action="append", default=[], help="client K's own data file (K-th use)")
    ns = parser.parse_args()
    _simulation_main(ns.config_json, ns.out_dir, ns.run_dir, ns.client_state_root, ns.num_cpus, ns.data_file)
