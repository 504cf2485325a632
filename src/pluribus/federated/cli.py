"""`pluribus fed ...`: run FedBone (or a baseline) from a TOML config, in-process or on Flower."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="FedBone: federated multi-task split learning on Flower.", no_args_is_help=True)


def _load(config: Path, overrides: list[str]) -> object:
    from dataclasses import replace

    from pluribus.config import config_from_dict, config_to_dict, load_config
    from pluribus.errors import ConfigError
    from pluribus.federated.config import FedBoneConfig

    cfg = load_config(FedBoneConfig, config)
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return replace(config_from_dict(FedBoneConfig, data, source=f"{config} + --set"))


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="TOML file with FedBoneConfig keys (see docs/fedbone.md)."),
    out: Path | None = typer.Option(None, help="Run folder (default runs/fedbone-<suite>-<algorithm>)."),
    resume: bool = typer.Option(True, help="Resume from the run folder's last checkpoint when the config matches."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set steps=50 (repeatable)."),
) -> None:
    """Train in-process (deterministic), writing config, metrics, report and checkpoints to a run folder."""
    import torch

    from pluribus.federated.config import FedBoneConfig
    from pluribus.federated.simulate import run_fedbone

    cfg = _load(config, set_)
    assert isinstance(cfg, FedBoneConfig)
    torch.manual_seed(cfg.seed)
    folder = out or Path("runs") / f"fedbone-{cfg.suite}-{cfg.algorithm}"
    result = run_fedbone(cfg, run_dir=folder, resume=resume)
    typer.echo(json.dumps({"run_dir": str(folder), "final": result.final, "bytes_total": result.bytes.get("total"),
                           "faults": result.faults, "quarantined": result.quarantined,
                           "wall_s": round(result.wall_s, 2)}, indent=2))


@app.command()
def flower(
    config: Path = typer.Option(..., "--config", "-c", help="TOML file with FedBoneConfig keys."),
    engine: str = typer.Option("inprocess", help="inprocess (no SuperLink), simulation (Flower's Ray engine) or "
                                                 "deployment (SuperLink + one SuperNode per client on loopback)."),
    out: Path | None = typer.Option(None, "--out", "--run-dir",
                                    help="Run folder (config, metrics, report, checkpoints); rerun = resume."),
    resume: bool = typer.Option(True, help="Resume from the run folder's last checkpoint when the config matches."),
    client_state_root: Path | None = typer.Option(
        None, help="Where clients keep their own checkpoints, one partition-K folder each (default <out>/clients)."),
    timeout_s: float = typer.Option(600.0, help="Hard limit for the simulation/deployment engine's processes."),
    num_cpus: int | None = typer.Option(None, help="CPUs Ray may use (simulation engine)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    worker: bool = typer.Option(False, "--worker", help="Deployment engine: keep each client in a long-lived worker "
                                "process next to its SuperNode (started on its first message, stopped at the end)."),
) -> None:
    """Run FedBone through its Flower ServerApp/ClientApp and print the final metrics and bytes."""
    from pluribus.errors import ConfigError
    from pluribus.federated.config import FedBoneConfig
    from pluribus.federated.flower_run import ENGINES, FlowerRunResult, run_fedbone_flower

    if engine not in ENGINES:
        raise ConfigError(f"--engine: unknown {engine!r}; use one of {', '.join(ENGINES)}")
    cfg = _load(config, set_)
    assert isinstance(cfg, FedBoneConfig)
    if cfg.algorithm != "fedbone":
        raise ConfigError("the Flower apps run FedBone only; run baselines with `pluribus fed run`")
    result = run_fedbone_flower(cfg, engine=engine, timeout_s=timeout_s, run_dir=out, resume=resume,  # type: ignore[arg-type]
                                client_state_root=client_state_root, num_cpus=num_cpus, worker=worker)
    assert isinstance(result, FlowerRunResult)
    steps = result.step_times[1:] or result.step_times  # the first step also loads each client's data
    typer.echo(json.dumps({"engine": engine, "run_dir": result.run_dir, "resumed_from": result.resumed_from,
                           "final": result.final, "bytes": result.bytes["by_category"], "faults": result.faults,
                           "steps_done": result.steps_done,
                           "mean_step_s_after_first": sum(steps) / max(len(steps), 1)}, indent=2))


@app.command("flower-app")
def flower_app(
    folder: Path = typer.Argument(..., help="Folder to write the Flower App (pyproject.toml) into."),
    config: Path = typer.Option(..., "--config", "-c", help="TOML file with FedBoneConfig keys."),
    run_dir: Path | None = typer.Option(None, help="The ServerApp's run folder (checkpoints, flower_result.json); "
                                                   "rerunning the app resumes it."),
    client_state_root: Path | None = typer.Option(
        None, help="Client checkpoint root for SuperNodes without a 'state-dir' node config."),
    poll_s: float = typer.Option(0.1, help="How often the ServerApp polls for replies (0 = Flower's 3 s)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
) -> None:
    """Write a Flower App folder for the deployment engine: then `flwr run <folder> <superlink>`."""
    from pluribus.federated.config import FedBoneConfig
    from pluribus.federated.server_app import write_flower_app

    cfg = _load(config, set_)
    assert isinstance(cfg, FedBoneConfig)
    path = write_flower_app(folder, cfg, run_dir=run_dir, client_state_root=client_state_root, poll_s=poll_s)
    typer.echo(f"wrote {path}; start SuperNodes with --node-config 'partition-id=K state-dir=\"DIR\"' "
               f"for K in 0..{cfg.num_clients - 1}")


@app.command()
def worker(
    state_dir: Path = typer.Option(..., "--state-dir", help="The client's state directory (its SuperNode's "
                                                            "'state-dir' node config): socket, pid file, log."),
    idle_s: float = typer.Option(900.0, help="Exit after this many seconds without a message."),
    stop: bool = typer.Option(False, "--stop", help="Stop the worker serving --state-dir (by its pid file)."),
) -> None:
    """Run one client's long-lived FedBone worker (SuperNodes with node config worker=true forward to it)."""
    from pluribus.federated.worker import serve, stop_worker

    if stop:
        pid = stop_worker(state_dir)
        typer.echo(f"stopped worker pid {pid}" if pid is not None else f"no worker running for {state_dir}")
        return
    serve(state_dir, idle_s=idle_s)


@app.command("init-config")
def init_config(
    path: Path = typer.Argument(..., help="Where to write a default FedBone config (TOML)."),
    suite: str = typer.Option("digits", help="digits, mnist, yeast or movielens."),
) -> None:
    """Write a default config for a suite (one client per task) to edit and run."""
    from dataclasses import replace

    from pluribus.config import save_config
    from pluribus.errors import ConfigError
    from pluribus.federated.config import FedBoneConfig
    from pluribus.federated.tasks import SUITE_TASKS

    defaults_for = ("digits", "mnist", "yeast", "movielens")
    if suite not in defaults_for:
        raise ConfigError(f"--suite: unknown suite {suite!r}; a default config exists for {', '.join(defaults_for)}")
    tasks = SUITE_TASKS[suite]
    image = ("digit", "parity", "segmentation", "reconstruction")
    defaults = {"digits": image, "mnist": image, "yeast": tasks, "movielens": tasks[:4]}
    cfg = replace(FedBoneConfig(), suite=suite, tasks=tuple(defaults.get(suite, tasks)))
    save_config(cfg, path)
    typer.echo(f"wrote {path}")
