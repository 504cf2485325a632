"""`pluribus fed ...`: run FedBone (or a baseline) from a TOML config, in-process or on Flower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:

    from pluribus.data.schema import UserDataset
    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.flower.run import FlowerRunResult

app = typer.Typer(help="FedBone: federated multi-task split learning on Flower.", no_args_is_help=True)


def _load(config: Path, overrides: list[str]) -> object:
    from dataclasses import replace

    from pluribus.config import config_from_dict, config_to_dict, load_config
    from pluribus.errors import ConfigError
    from pluribus.federated.core.config import FedBoneConfig

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
    config: Path = typer.Option(..., "--config", "-c", help="TOML file with FedBoneConfig keys (see docs/guides/fedbone.md)."),
    out: Path | None = typer.Option(None, help="Run folder (default runs/fedbone-<suite>-<algorithm>)."),
    resume: bool = typer.Option(True, help="Resume from the run folder's last checkpoint when the config matches."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set steps=50 (repeatable)."),
    force: bool = typer.Option(False, help="Start the run folder over, even if it holds another run."),
) -> None:
    """Train in-process (deterministic), writing config, metrics, report and checkpoints to a run folder."""
    import torch

    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.studies.simulate import run_fedbone

    cfg = _load(config, set_)
    assert isinstance(cfg, FedBoneConfig)
    _check_local_features(cfg)
    torch.manual_seed(cfg.seed)
    folder = out or Path("runs") / f"fedbone-{cfg.suite}-{cfg.algorithm}"
    if force:
        from pluribus.runs import RunFolder

        RunFolder(folder, cfg, force=True)  # cleared and set up for this config; the run below starts fresh
    resumed_at = _checkpoint_step(folder) if resume else None  # FedBone and every baseline
    result = run_fedbone(cfg, run_dir=folder, resume=resume)
    if resumed_at:  # said after the run: run_fedbone refuses a folder whose config differs, so it did resume
        typer.echo(f"resumed from {folder / 'checkpoints' / 'latest'} at step {resumed_at} of {cfg.steps}", err=True)
    typer.echo(json.dumps({"run_dir": str(folder), "final": result.final, "bytes_total": result.bytes.get("total"),
                           "faults": result.faults, "quarantined": result.quarantined,
                           "wall_s": round(result.wall_s, 2)}, indent=2))


def _check_local_features(cfg: object) -> None:
    """An in-process run holds every client: refuse, before anything is written, a suite 'features' config that
    names no data (a server's config, as ``fed prepare`` writes it) or data that are not there."""
    from pluribus.errors import ConfigError, DataError
    from pluribus.federated.core.config import FedBoneConfig

    assert isinstance(cfg, FedBoneConfig)
    if cfg.suite != "features":
        return
    if not cfg.features_path:
        raise ConfigError("features_path: this config names no data (a server's config: each institution keeps its "
                          "own file); to run every institution in one process, add --set "
                          "features_path=<the institutions folder pluribus fed prepare wrote>")
    if not Path(cfg.features_path).exists():
        raise DataError("feature suite file or folder not found", path=cfg.features_path, field="features_path")


def _checkpoint_step(folder: Path) -> int | None:
    """The step after which run folder ``folder``'s last in-process checkpoint was taken (None: no checkpoint)."""
    from pluribus.runs import RunFolder

    if not (folder / "config.toml").exists():
        return None
    ckpt = RunFolder(folder).load_checkpoint("latest")  # no config: only reads, creates nothing
    return None if ckpt is None else int(ckpt[1].get("next_step", 0))


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
    superlink: str | None = typer.Option(None, help="HOST:PORT of a SuperLink that already runs, one client joined "
                                                    "per institution (`pluribus federation join`): submit the run "
                                                    "there instead of launching one (TLS by default)."),
    root_certificates: Path | None = typer.Option(None, help="With --superlink: the federation's CA certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="With --superlink: no TLS (a closed test network only)."),
    force: bool = typer.Option(False, help="Start the run folder (--out) over, even if it holds another run."),
) -> None:
    """Run FedBone through its Flower ServerApp/ClientApp and print the final metrics and bytes."""
    from pluribus.errors import ConfigError
    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.flower.run import ENGINES, FlowerRunResult, run_fedbone_flower

    if engine not in ENGINES:
        raise ConfigError(f"--engine: unknown {engine!r}; use one of {', '.join(ENGINES)}")
    cfg = _load(config, set_)
    assert isinstance(cfg, FedBoneConfig)
    if cfg.algorithm != "fedbone":
        raise ConfigError("the Flower apps run FedBone only; run baselines with `pluribus fed run`")
    if superlink is None and (root_certificates is not None or insecure):
        raise ConfigError("--root-certificates and --insecure go with --superlink")
    if force and out is not None:
        from pluribus.runs import RunFolder

        RunFolder(out, cfg, force=True)  # cleared and set up for this config; the run below starts fresh
    if superlink is not None:
        result = _submit_fedbone(cfg, superlink, root_certificates, insecure=insecure, out=out, resume=resume,
                                 timeout_s=timeout_s, others=(engine != "inprocess", client_state_root is not None,
                                                              num_cpus is not None, worker))
        engine = f"deployment, SuperLink {superlink}"
    else:
        result = run_fedbone_flower(cfg, engine=engine, timeout_s=timeout_s, run_dir=out, resume=resume,  # type: ignore[arg-type]
                                    client_state_root=client_state_root, num_cpus=num_cpus, worker=worker)
    assert isinstance(result, FlowerRunResult)
    if result.resumed_from is not None and result.run_dir is not None:
        from pluribus.federated.flower.server_app import SERVER_CHECKPOINT

        typer.echo(f"resumed from {Path(result.run_dir) / 'checkpoints' / SERVER_CHECKPOINT} at step "
                   f"{result.resumed_from} of {cfg.steps}", err=True)
    steps = result.step_times[1:] or result.step_times  # the first step also loads each client's data
    typer.echo(json.dumps({"engine": engine, "run_dir": result.run_dir, "resumed_from": result.resumed_from,
                           "final": result.final, "bytes": result.bytes["by_category"], "faults": result.faults,
                           "steps_done": result.steps_done,
                           "mean_step_s_after_first": sum(steps) / max(len(steps), 1)}, indent=2))


def _submit_fedbone(cfg: FedBoneConfig, superlink: str, root_certificates: Path | None, *, insecure: bool,
                    out: Path | None, resume: bool, timeout_s: float, others: tuple[bool, ...]) -> FlowerRunResult:
    """Submit the run to the SuperLink at ``superlink`` (``others``: whether a launch-only option was given)."""
    from pluribus.deploy.address import choose_tls, parse_address
    from pluribus.deploy.submit import submit_fedbone
    from pluribus.errors import ConfigError

    if any(others):
        raise ConfigError("--superlink: each client's state and worker were set when it joined; drop --engine, "
                          "--client-state-root, --num-cpus and --worker")
    if out is None:
        raise ConfigError("--superlink needs --out: the run folder, on the SuperLink's host")
    address = parse_address(superlink)
    ca = choose_tls(address, root_certificates, insecure=insecure)
    return submit_fedbone(cfg, address, ca=ca, run_dir=out, timeout_s=timeout_s, resume=resume)


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
    from pluribus.federated.core.config import FedBoneConfig
    from pluribus.federated.flower.server_app import write_flower_app

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
    lease_s: float = typer.Option(120.0, help="Another run may take the worker over only after the running run "
                                              "finished or sent nothing for this many seconds."),
    stop: bool = typer.Option(False, "--stop", help="Stop the worker serving --state-dir (by its pid file)."),
) -> None:
    """Run one client's long-lived FedBone worker (SuperNodes with node config worker=true forward to it)."""
    from pluribus.errors import ConfigError
    from pluribus.federated.flower.worker import serve
    from pluribus.federated.flower.worker_socket import stop_worker

    if stop:
        pid = stop_worker(state_dir)
        typer.echo(f"stopped worker pid {pid}" if pid is not None else f"no worker running for {state_dir}")
        return
    if not lease_s > 0:
        raise ConfigError(f"--lease-s must be > 0, got {lease_s}")
    serve(state_dir, idle_s=idle_s, lease_s=lease_s)


@app.command("init-config")
def init_config(
    path: Path = typer.Argument(..., help="Where to write a default FedBone config (TOML)."),
    suite: str = typer.Option("digits", help="digits, mnist, yeast or movielens."),
) -> None:
    """Write a default config for a suite (one client per task) to edit and run."""
    from dataclasses import replace

    from pluribus.config import save_config
    from pluribus.errors import ConfigError
    from pluribus.federated.core.config import SUITE_TASKS, FedBoneConfig

    defaults_for = ("digits", "mnist", "yeast", "movielens")
    if suite not in defaults_for:
        raise ConfigError(f"--suite: unknown suite {suite!r}; a default config exists for {', '.join(defaults_for)}")
    tasks = SUITE_TASKS[suite]
    image = ("digit", "parity", "segmentation", "reconstruction")
    defaults = {"digits": image, "mnist": image, "yeast": tasks, "movielens": tasks[:4]}
    cfg = replace(FedBoneConfig(), suite=suite, tasks=tuple(defaults.get(suite, tasks)))
    save_config(cfg, path)
    typer.echo(f"wrote {path}")


FEATURE_KINDS = ("simple",)


@app.command()
def prepare(
    data: str = typer.Argument(..., help="Your data: a .jsonl file or a data set folder (also synthetic:N)."),
    out: Path = typer.Option(..., "--out", help="Folder to write institutions/client-K.safetensors (one file per "
                                                "institution), fedbone.toml and institutions.json into."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated labels of the data; institution k trains "
                                                   "label k (cycling when there are more institutions)."),
    institution_column: str | None = typer.Option(
        None, help="A profile column or label whose values are the institutions (one per distinct value)."),
    institutions: int | None = typer.Option(None, help="Or: split the users at random into this many "
                                                       "institutions (with --seed)."),
    seed: int = typer.Option(0, help="Seed of the user split and of the run."),
    features: str = typer.Option("simple", help="Input features per user: simple (the demo's simple features: "
                                                "the profile columns, or per-source event counts without a "
                                                "profile; standardised)."),
    steps: int = typer.Option(50, help="Training steps in the written config."),
) -> None:
    """Make FedBone institutions from your own data: one file per institution (its users and its task's labels
    only, for that institution's node) and a server config that holds no user data."""
    from pluribus.config import save_config
    from pluribus.data.features import user_feature_tokens
    from pluribus.data.store import load_user_data
    from pluribus.errors import ConfigError
    from pluribus.federated.studies.tasks import (
        feature_suite_config,
        institution_file,
        save_institution_files,
    )
    from pluribus.io import ensure_folder, remove_empty_folders, write_json

    if features not in FEATURE_KINDS:
        raise ConfigError(f"--features: unknown {features!r}; use one of {', '.join(FEATURE_KINDS)}")
    if steps < 1:
        raise ConfigError(f"--steps: need at least 1 training step, got {steps}")
    if (institution_column is None) == (institutions is None):
        raise ConfigError("give exactly one of --institution-column NAME and --institutions N")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; expected a folder")
    ds = load_user_data(data)
    plan = plan_institutions(ds, data, [t.strip() for t in tasks.split(",")], column=institution_column,
                             count=institutions, seed=seed)
    folder = out / "institutions"
    files = [institution_file(folder, k) for k in range(len(plan.tasks))]
    written = [*files, out / "fedbone.toml", out / "institutions.json"]
    earlier = {f for f in written if f.exists()}  # a previous prepare's files: replaced atomically, never removed
    created = ensure_folder(folder)
    try:
        save_institution_files(folder, user_feature_tokens(ds), ds, plan.tasks, seed=seed, partition=plan.partition,
                               names=[str(r["institution"]) for r in plan.rows])
        # the server's config: task names, seed, split and model; no user data, no path to any
        config_path = save_config(feature_suite_config("", plan.tasks, seed=seed, steps=steps), out / "fedbone.toml")
        write_json(out / "institutions.json", {"data": data, "column": institution_column, "seed": seed,
                                               "institutions": [{**row, "file": str(f.resolve())}
                                                                for row, f in zip(plan.rows, files, strict=True)]})
    except BaseException:
        for f in written:
            if f not in earlier:
                f.unlink(missing_ok=True)
        remove_empty_folders(created)
        raise
    for row, f in zip(plan.rows, files, strict=True):
        typer.echo(f"client {row['client']}: institution {row['institution']!r}, {row['users']} users, "
                   f"task {row['task']!r} ({row['labelled']} labelled): {f}")
    here = f"--set features_path={folder.resolve()}"
    typer.echo(f"wrote one file per institution in {folder} and the server config {config_path} (no user data); "
               f"give institution K's node only its own file (node config 'partition-id=K data-file=\"{folder}/"
               f"client-K.safetensors\"'); on this host, every institution at once:\n"
               f"  pluribus fed run --config {config_path} {here} --out {out / 'run'}\n"
               f"  pluribus fed flower --config {config_path} {here} --engine inprocess --out {out / 'flower'}")


class InstitutionPlan:
    """Institutions made from a data set: each user's institution index, each client's task, a summary row each."""

    def __init__(self, partition: object, tasks: list[str], rows: list[dict[str, object]]) -> None:
        import numpy as np

        self.partition: np.ndarray = np.asarray(partition, dtype=np.int64)
        self.tasks = tasks
        self.rows = rows


def plan_institutions(ds: UserDataset, data: str, tasks: list[str], *, column: str | None, count: int | None,
                      seed: int) -> InstitutionPlan:
    """Assign users to institutions (by a profile column or label, or a seeded split) and a task to each; a bad
    label, column or split raises ConfigError/DataError naming the option or the file's field."""
    import numpy as np

    from pluribus.data.features import check_class_labels
    from pluribus.data.partition import iid_partition
    from pluribus.errors import ConfigError, DataError

    if not tasks or any(not t for t in tasks):
        raise ConfigError(f"--tasks: expected comma-separated label names, got {','.join(tasks)!r}")
    check_class_labels(ds, data, tasks, option="--tasks", needed_by="FedBone clients")
    users = [str(u) for u in ds.user_ids]
    if column is not None:
        profile_cols = [] if ds.profile is None else [str(c) for c in ds.profile.columns]
        if column in profile_cols:
            assert ds.profile is not None
            values = ds.profile[column].reindex(ds.user_ids)
            field = f"profile.{column}"
        elif column in ds.labels.columns:
            values = ds.labels[column].reindex(ds.user_ids)
            field = f"labels.{column}"
        else:
            raise ConfigError(f"--institution-column: {data} has no profile column or label {column!r}; profile: "
                              f"{', '.join(profile_cols) or 'none'}; labels: {', '.join(map(str, ds.labels.columns)) or 'none'}")
        if column in tasks:
            raise ConfigError(f"--tasks: {column!r} is the institution column; an institution's task must vary "
                              "within it")
        missing = np.flatnonzero(values.isna().to_numpy())
        if len(missing):
            raise DataError(f"user {users[missing[0]]!r} (and {len(missing) - 1} more) has no {column!r}; every user "
                            "needs an institution", path=data, field=field, expected="a value for every user")
        text = values.astype(str).to_numpy()
        names = sorted(set(text.tolist()))
        index = {n: i for i, n in enumerate(names)}
        partition = np.array([index[v] for v in text], dtype=np.int64)
    else:
        assert count is not None
        if count < 2:
            raise ConfigError(f"--institutions: federated training needs at least 2 institutions, got {count}")
        if count > len(users):
            raise ConfigError(f"--institutions: {count} institutions for {len(users)} users in {data}")
        names = [f"part{k}" for k in range(count)]
        partition = np.full(len(users), -1, dtype=np.int64)
        for k, part in enumerate(iid_partition(len(users), count, seed=seed)):
            partition[part] = k
    if len(names) < 2:
        raise ConfigError(f"--institution-column: {column!r} has one value ({names[0]!r}) in {data}; federated "
                          "training needs at least 2 institutions")
    if len(tasks) > len(names):
        raise ConfigError(f"--tasks: {len(tasks)} labels for {len(names)} institutions; each institution trains one")
    client_tasks = [tasks[k % len(tasks)] for k in range(len(names))]
    rows: list[dict[str, object]] = []
    for k, (name, task) in enumerate(zip(names, client_tasks, strict=True)):
        mask, values = ds.label_array(task)
        label = np.full(len(users), -1, dtype=np.int64)
        label[np.flatnonzero(mask)] = values
        mine = label[partition == k]
        mine = mine[mine >= 0]
        classes = np.unique(mine)
        if len(classes) < 2:
            raise DataError(f"institution {name!r} has {len(mine)} users labelled {task!r}, "
                            f"{'all of one class' if len(mine) else 'none'}; its task cannot be trained",
                            path=data, field=f"labels.{task}", expected="at least two classes in each institution")
        rows.append({"client": k, "institution": name, "task": task, "users": int((partition == k).sum()),
                     "labelled": len(mine)})
    return InstitutionPlan(partition, client_tasks, rows)
