"""`pluribus fuse`: `run` (train parties on a label-skewed split, fuse them under LDP, report privacy and
accuracy in one process), `train-parties` (write each party's own model and data files) and `flower` (fuse
parties' files with each party a Flower ClientApp and a relaying hub, on the in-process, simulation or
deployment engine)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import nn

    from pluribus.fusion.core.config import FusionConfig, RunConfig
    from pluribus.fusion.flower.apps import FlowerFusionResult, PartyFiles
    from pluribus.fusion.privacy.accounting import PrivacyLedger
    from pluribus.fusion.studies.experiment import Split
    from pluribus.runs import RunFolder

app = typer.Typer(help="PrivFusion: locally differentially private model fusion.", no_args_is_help=True)

MATCH_START_HELP = ("Start of the weight-matching descent: forward (default: one input-side pass first) or "
                    "identity (the original Re-Basin start).")
MATCH_TOL_HELP = ("Accept a matching step only if it gains more than this fraction of its objective "
                  "(default 1e-2; 0 = descend until nothing changes).")
BUDGET_HELP = ("Each party's privacy budget: epsilon per weight scalar over every release of its model, kept in "
               "its odometer; a release past it is refused (default 16: four releases at epsilon 4).")
PARTY_STATE = "party-state"
SEEDED_WARNING = ("warning: NOT PRIVATE: --noise-seed / fusion.noise_seed makes every release reproducible by anyone "
                  "who knows or guesses the seed; use it for experiments and tests only")


def _warn_if_seeded(cfg: FusionConfig) -> None:
    """The NOT PRIVATE warning on stderr when the noise is seeded (printed at a command's start and end)."""
    if cfg.noise_seed is not None and math.isfinite(cfg.epsilon):
        typer.echo(SEEDED_WARNING, err=True)


def _echo_spent(ledgers: Sequence[PrivacyLedger]) -> None:
    """One line per party: this release's epsilon per weight scalar and what the model has cost so far."""
    for led in ledgers:
        if not led.releases:
            typer.echo(f"{led.party}: {led.status}; nothing released")
            continue
        this = led.per_scalar()[0]
        line = f"{led.party}: epsilon {this:g} per weight scalar in this release"
        if led.spent is not None:
            line += (f"; {float(led.spent['per_scalar_epsilon']):g} spent on this model in "
                     f"{int(led.spent['releases'])} releases (budget {led.budget:g})")
        typer.echo(line)


@app.command()
def run(
    config: Path | None = typer.Option(None, help="TOML file with a RunConfig (sections [fusion], [adapter])."),
    out: Path = typer.Option(Path("runs/fusion"), help="Run folder."),
    dataset: str | None = typer.Option(None, help="digits or mnist."),
    parties: int | None = typer.Option(None, help="Number of parties K."),
    alpha: float | None = typer.Option(None, help="Dirichlet label-skew alpha."),
    epsilon: float | None = typer.Option(None, help="Per-scalar epsilon of each party (inf: no DP)."),
    mechanism: str | None = typer.Option(None, help="laplace, gaussian, duchi, piecewise or hybrid."),
    solver: str | None = typer.Option(None, help="hungarian, ot, graph or identity."),
    match_start: str | None = typer.Option(None, help=MATCH_START_HELP),
    match_tol: float | None = typer.Option(None, help=MATCH_TOL_HELP),
    adapter: bool | None = typer.Option(None, "--adapter/--no-adapter", help="Train the perturbation filter adapter."),
    seed: int | None = typer.Option(None, help="Seed of split, partition and training."),
    resume: bool = typer.Option(True, help="Resume a run folder with the same config."),
    force: bool = typer.Option(False, help="Start the run folder over, even if it holds another run (the parties' "
                                           "privacy odometers in <out>/party-state are kept)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (1 is much faster on a busy small machine)."),
    budget: float | None = typer.Option(None, help=BUDGET_HELP),
) -> None:
    """Train K party models, fuse them with PrivFusion, and write metrics, a report and the privacy ledger.

    Each simulated party releases its model once per command, debited from its privacy odometer in
    ``<out>/party-state/party<K>`` (the plain fused model and the adapter are built from the same releases)."""
    import dataclasses

    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    import copy

    from pluribus.eval.report import bar_plot, markdown_table
    from pluribus.fusion.core.config import AdapterConfig
    from pluribus.fusion.core.fuse import fuser_ledger, privfusion, repair_fused
    from pluribus.fusion.core.models import accuracy, ensemble_accuracy
    from pluribus.fusion.privacy.accounting import privacy_report, privacy_report_markdown
    from pluribus.fusion.privacy.odometer import check_budget
    from pluribus.io import write_json
    from pluribus.runs import RunFolder

    cfg = _run_config(config, dataset=dataset, parties=parties, alpha=alpha, seed=seed)
    fusion_over: dict[str, Any] = {k: v for k, v in {"epsilon": epsilon, "mechanism": mechanism, "solver": solver,
                                                     "match_start": match_start,
                                                     "match_tol": match_tol}.items() if v is not None}
    cfg = dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, **fusion_over))
    if adapter is not None:
        cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, kind="residual" if adapter else "none"))
    if budget is not None:
        check_budget(budget, what="--budget")
    _warn_if_seeded(cfg.fusion)
    folder = RunFolder(out, cfg, resume=resume, force=force, keep=(PARTY_STATE,))
    if folder.is_done("run"):
        typer.echo(f"{folder.path}: a finished run with the same options; nothing recomputed (--force to redo)",
                   err=True)
        done = folder.metrics()["accuracy"]
        typer.echo(markdown_table([{"model": k, "test accuracy": v} for k, v in done.items()]))
        typer.echo(f"run folder: {folder.path}")
        return

    split, parts, models = _train_parties(cfg, folder)
    metrics = {f"party{k}": accuracy(m, split.x_test, split.y_test) for k, m in enumerate(models)}
    metrics["ensemble (upper bound)"] = ensemble_accuracy(models, split.x_test, split.y_test)
    calib = (split.x_calib, split.y_calib)
    # one release per party: the adapter repairs the very fused model the plain row reports
    plain = privfusion(models, config=cfg.fusion, calib=calib, adapter=AdapterConfig(kind="none"),
                       weights=[float(len(p)) for p in parts],
                       state_dirs=[folder.path / PARTY_STATE / f"party{k}" for k in range(len(models))], budget=budget)
    results = {"fused": plain}
    if cfg.adapter.kind != "none":
        fuser = copy.deepcopy(plain.fuser_ledger) if plain.fuser_ledger is not None else fuser_ledger()
        repaired, history = repair_fused(copy.deepcopy(plain.model), calib, cfg.adapter, fuser)
        results["fused + adapter"] = dataclasses.replace(plain, model=repaired, adapter_history=history,
                                                         fuser_ledger=fuser if fuser.releases else None)
    for name, result in results.items():
        metrics[name] = accuracy(result.model, split.x_test, split.y_test)
    folder.log_metrics("accuracy", metrics)
    last = results.get("fused + adapter", results["fused"])
    write_json(folder.path / "privacy.json", privacy_report(last.all_ledgers))
    folder.save_checkpoint("fused", {k: v for k, v in results["fused"].model.state_dict().items()},
                           {"epsilon": str(cfg.fusion.epsilon)})
    bar_plot(folder.plot_path("accuracy"), {k: (v, 0.0) for k, v in metrics.items()}, ylabel="test accuracy",
             title=f"PrivFusion on {cfg.dataset}, K={cfg.parties}, eps={cfg.fusion.epsilon:g}")
    eps_text = "inf (no DP)" if not math.isfinite(cfg.fusion.epsilon) else f"{cfg.fusion.epsilon:g}"
    report = (
        f"# PrivFusion run\n\nDataset {cfg.dataset}, {cfg.parties} parties, Dirichlet alpha {cfg.alpha:g}, "
        f"per-scalar epsilon {eps_text}, mechanism {cfg.fusion.mechanism}, solver {cfg.fusion.solver}.\n"
        "PrivFusion here is a reconstruction from the paper's abstract, not the authors' method.\n\n"
        + markdown_table([{"model": k, "test accuracy": v} for k, v in metrics.items()])
        + "\n\n" + privacy_report_markdown(last.all_ledgers)
    )
    folder.write_report(report)
    folder.mark_done("run", {"accuracy": metrics})
    typer.echo(markdown_table([{"model": k, "test accuracy": v} for k, v in metrics.items()]))
    _echo_spent(last.ledgers)
    typer.echo(f"run folder: {folder.path}")
    _warn_if_seeded(cfg.fusion)


def _run_config(path: Path | None, **overrides: Any) -> RunConfig:
    """The RunConfig from a TOML file (or the defaults) with the given non-None overrides."""
    import dataclasses

    from pluribus.config import load_config
    from pluribus.fusion.core.config import RunConfig

    cfg = load_config(RunConfig, path) if path is not None else RunConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _party_data(cfg: RunConfig, data: str | None = None,
                task: str | None = None) -> tuple[Split, list[Any], Callable[[], nn.Module]]:
    """The split, the label-skewed partition and a model constructor: ``cfg.dataset``'s images, or with ``data``
    the user's own data set, each labelled user's simple features (standardised) and label ``task``, with
    calibration and test sets of 20% of those users each (MLP parties only)."""
    from pluribus.data.partition import dirichlet_partition
    from pluribus.errors import ConfigError
    from pluribus.fusion.studies.experiment import load_images, model_factory, split_images

    if data is None:
        x, y = load_images(cfg.dataset)
        split = split_images(x, y, calib_size=cfg.calib_size, seed=cfg.seed)
        parts = dirichlet_partition(split.y_train.numpy(), cfg.parties, alpha=cfg.alpha, seed=cfg.seed)
        return split, parts, model_factory(cfg.model, x.shape[-1], cfg.hidden)
    import torch

    from pluribus.data.features import check_class_labels, user_feature_tokens
    from pluribus.data.store import load_user_data
    from pluribus.fusion.core.models import MLP

    if task is None:
        raise ConfigError("--data needs --task LABEL: the label the parties' models predict")
    if cfg.model != "mlp":
        raise ConfigError(f"--model: parties trained on --data are MLPs over the users' features, not {cfg.model!r}")
    ds = load_user_data(data)
    check_class_labels(ds, data, [task], option="--task", needed_by="fused party models")
    mask, labels = ds.label_array(task)
    x, y = user_feature_tokens(ds)[torch.tensor(mask), 0, :], torch.tensor(labels)
    spec = ds.tasks[task]
    n_classes = len(spec.classes) or (2 if spec.kind == "binary" else int(y.max()) + 1)
    n_features = int(x.shape[1])
    split = split_images(x, y, calib_size=max(1, round(0.2 * len(y))), seed=cfg.seed)
    if cfg.parties > len(split.y_train):
        raise ConfigError(f"--parties: {cfg.parties} parties for the {len(split.y_train)} training users of {data} "
                          f"({len(y)} labelled {task!r}, 40% of them held out for calibration and test)")
    smallest = max(1, min(10, len(split.y_train) // (2 * cfg.parties)))  # a few users each on a small data set
    parts = dirichlet_partition(split.y_train.numpy(), cfg.parties, alpha=cfg.alpha, seed=cfg.seed,
                                min_partition_size=smallest)
    return split, parts, lambda: MLP(n_features, tuple(cfg.hidden), n_classes)


def _train_parties(cfg: RunConfig, folder: RunFolder | None = None, data: str | None = None,
                   task: str | None = None) -> tuple[Split, list[Any], list[nn.Module]]:
    """The data split, the label-skewed partition and one trained model per party, as ``cfg`` says (with
    ``data`` and ``task``: on the user's own data set, see ``_party_data``).

    With a run folder every trained party is checkpointed as it finishes, and a rerun reuses them (each party's
    training is seeded on its own, so a resumed run trains exactly the models an uninterrupted one would).
    """
    from pluribus.fusion.studies.experiment import train_parties

    split, parts, factory = _party_data(cfg, data, task)
    trained: dict[int, nn.Module] = {}
    if folder is not None:
        for k in range(cfg.parties):
            saved = folder.load_checkpoint(f"party{k}")
            if saved is not None:
                trained[k] = factory()
                trained[k].load_state_dict(saved[0])
        if trained:
            typer.echo(f"resumed from {folder.path / 'checkpoints'}: {len(trained)} of {cfg.parties} party models "
                       "already trained", err=True)

    def keep(k: int, model: nn.Module) -> None:
        if folder is not None:
            folder.save_checkpoint(f"party{k}", model.state_dict(), {"party": k})

    models = train_parties(factory, split.x_train, split.y_train, parts, same_init=cfg.same_init,
                           epochs=cfg.epochs, seed=cfg.seed, progress=True, trained=trained, on_trained=keep)
    return split, list(parts), models


@app.command("train-parties")
def train_parties_cmd(
    out: Path = typer.Option(..., help="Folder to write: one <party>/ folder each, calib, test, parties.toml."),
    config: Path | None = typer.Option(None, help="TOML file with a RunConfig (dataset, model, parties, ...)."),
    dataset: str | None = typer.Option(None, help="digits or mnist."),
    model: str | None = typer.Option(None, help="mlp or cnn."),
    parties: int | None = typer.Option(None, help="Number of parties K."),
    alpha: float | None = typer.Option(None, help="Dirichlet label-skew alpha."),
    epochs: int | None = typer.Option(None, help="Local training epochs."),
    seed: int | None = typer.Option(None, help="Seed of split, partition and training."),
    data: str | None = typer.Option(None, help="Your own data (.jsonl, a data set folder or synthetic:N) instead "
                                               "of --dataset: MLP parties over each user's simple features, "
                                               "calibration and test sets of 20% of the labelled users each."),
    task: str | None = typer.Option(None, help="With --data: the label (binary or multiclass) the parties predict."),
) -> None:
    """Train K party models on a label-skewed split and write each party's own files (model + data)."""
    import tomli_w
    import torch

    from pluribus.errors import ConfigError
    from pluribus.fusion.flower.party_files import save_party_data, save_party_model
    from pluribus.io import write_text

    if data is not None and dataset is not None:
        raise ConfigError("give --dataset (digits or mnist) or --data (your own data), not both")
    if task is not None and data is None:
        raise ConfigError("--task needs --data: the built-in data sets have one label")
    cfg = _run_config(config, dataset=dataset, model=model, parties=parties, alpha=alpha, epochs=epochs, seed=seed)
    split, parts, models = _train_parties(cfg, data=data, task=task)
    table: dict[str, dict[str, str]] = {}
    for k, (part, trained) in enumerate(zip(parts, models, strict=True)):
        name = f"party{k}"
        idx = torch.as_tensor(part, dtype=torch.long)
        save_party_model(out / name / "model.safetensors", trained, party=name)
        save_party_data(out / name / "data.safetensors", split.x_train[idx], split.y_train[idx])
        table[name] = {"model": f"{name}/model.safetensors", "data": f"{name}/data.safetensors"}
    save_party_data(out / "calib.safetensors", split.x_calib, split.y_calib)
    save_party_data(out / "test.safetensors", split.x_test, split.y_test)
    write_text(out / "parties.toml", tomli_w.dumps({"parties": table}))
    typer.echo(f"{len(models)} parties written to {out} (parties.toml lists them; calib.safetensors and "
               "test.safetensors are a public calibration set and a test set)")


def _party_arg(text: str) -> tuple[str, Path, Path]:
    """``NAME=DIR`` (DIR holding model.safetensors and data.safetensors) or ``NAME=MODEL,DATA``."""
    from pluribus.errors import ConfigError

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--party {text!r}: expected NAME=DIR or NAME=MODEL_FILE,DATA_FILE")
    if "," in rest:
        model, _, data = rest.partition(",")
        return name, Path(model), Path(data)
    return name, Path(rest) / "model.safetensors", Path(rest) / "data.safetensors"


def _parties_from_toml(path: Path) -> list[tuple[str, Path, Path]]:
    """``[parties.NAME] model = ..., data = ...`` entries (paths relative to the TOML file's folder)."""
    from pluribus.config import read_toml
    from pluribus.errors import DataError

    table = read_toml(path, what="parties file").get("parties")
    if not isinstance(table, dict) or not table:
        raise DataError("no [parties.NAME] tables", path=path, field="parties")
    out = []
    for name, entry in table.items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("model", "data")):
            raise DataError(f"party {name!r} needs string keys 'model' and 'data'", path=path, field=f"parties.{name}")
        out.append((name, path.parent / entry["model"], path.parent / entry["data"]))
    return out


def _fusion_config(config: Path | None, overrides: dict[str, Any]) -> FusionConfig:
    import dataclasses

    from pluribus.config import load_config
    from pluribus.fusion.core.config import FusionConfig

    cfg = load_config(FusionConfig, config, section="fusion") if config is not None else FusionConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


@app.command()
def flower(
    engine: str = typer.Option("inprocess", help="inprocess, simulation (Ray) or deployment (SuperLink + SuperNodes)."),
    party: list[str] = typer.Option([], help="NAME=DIR (with model.safetensors, data.safetensors) or "
                                             "NAME=MODEL,DATA; repeat per party."),
    parties_toml: Path | None = typer.Option(None, help="TOML with [parties.NAME] model = ..., data = ..."),
    out: Path = typer.Option(Path("runs/fusion-flower"), help="Run folder (the hub's outputs)."),
    calib: Path | None = typer.Option(None, help="Public calibration data file (re-estimates BatchNorm at the hub)."),
    test: Path | None = typer.Option(None, help="Labelled data file to report the fused model's accuracy on."),
    config: Path | None = typer.Option(None, help="TOML file with a [fusion] section."),
    epsilon: float | None = typer.Option(None, help="Per-scalar epsilon of each party."),
    mechanism: str | None = typer.Option(None, help="laplace, gaussian, duchi, piecewise or hybrid."),
    solver: str | None = typer.Option(None, help="hungarian, ot, graph or identity."),
    match_start: str | None = typer.Option(None, help=MATCH_START_HELP),
    match_tol: float | None = typer.Option(None, help=MATCH_TOL_HELP),
    act_stats: bool | None = typer.Option(None, "--act-stats/--no-act-stats",
                                          help="Parties also release activation statistics on their own data."),
    noise_seed: int | None = typer.Option(None, help="Reproducible noise (NOT private; for tests only)."),
    private: bool = typer.Option(False, "--private", help="Refuse to run unless every release is private "
                                                          "(CSPRNG noise: no --noise-seed)."),
    budget: float | None = typer.Option(None, help=BUDGET_HELP),
    state_root: Path | None = typer.Option(None, help="Where each party keeps its state (privacy odometer, its own "
                                                      "fused model): <root>/<name>; default <model folder>/<name>.state."),
    timeout: float = typer.Option(600.0, help="Seconds the whole simulation/deployment run may take."),
    step_timeout: float = typer.Option(120.0, help="Seconds the hub waits for the parties at each step."),
    resume: bool = typer.Option(False, help="Reuse a run folder that holds the same config."),
    force: bool = typer.Option(False, help="Start the run folder over, even if it holds another run."),
    superlink: str | None = typer.Option(None, help="HOST:PORT of a SuperLink that already runs, with the parties "
                                                    "joined on their own hosts (`pluribus federation join`): submit "
                                                    "the run there instead of launching one (TLS by default)."),
    root_certificates: Path | None = typer.Option(None, help="With --superlink: the federation's CA certificate."),
    insecure: bool = typer.Option(False, "--insecure", help="With --superlink: no TLS (a closed test network only)."),
    num_parties: int | None = typer.Option(None, "--parties", help="With --superlink: how many parties joined."),
) -> None:
    """Fuse the parties' own model files, each party a Flower ClientApp and the hub a relaying ServerApp."""
    import dataclasses

    from pluribus.errors import ConfigError
    from pluribus.eval.report import markdown_table
    from pluribus.fusion.core.models import accuracy
    from pluribus.fusion.flower.apps import ENGINES, PartyFiles, check_parties, run_fusion_flower
    from pluribus.fusion.flower.party_files import load_party_data
    from pluribus.fusion.privacy.odometer import check_budget
    from pluribus.runs import RunFolder

    if engine not in ENGINES:
        raise ConfigError(f"--engine: unknown {engine!r}; choose one of {list(ENGINES)}")
    if superlink is None and (root_certificates is not None or insecure or num_parties is not None):
        raise ConfigError("--root-certificates, --insecure and --parties go with --superlink")
    if superlink is not None and (party or parties_toml or state_root or budget is not None or engine != "inprocess"):
        raise ConfigError("--superlink: each party named its own files, state and budget when it joined; drop "
                          "--party/--parties-toml/--state-root/--budget/--engine and give --parties N")
    listed = [_party_arg(p) for p in party] + (_parties_from_toml(parties_toml) if parties_toml else [])
    if superlink is None and len(listed) < 2:
        raise ConfigError(f"give at least 2 parties (--party NAME=PATH or --parties-toml), got {len(listed)}")
    cfg = _fusion_config(config, {"epsilon": epsilon, "mechanism": mechanism, "solver": solver,
                                  "use_act_stats": act_stats, "noise_seed": noise_seed,
                                  "match_start": match_start, "match_tol": match_tol})
    if private and cfg.noise_seed is not None:
        raise ConfigError("--private: a noise seed (--noise-seed or fusion.noise_seed) makes every release "
                          "reproducible, so it is NOT private; drop the seed or --private")
    if budget is not None:
        check_budget(budget, what="--budget")
    _warn_if_seeded(cfg)
    if superlink is not None:
        folder, res = _submit_fusion(cfg, superlink, root_certificates, insecure=insecure, num_parties=num_parties,
                                     out=out, calib=calib, resume=resume, force=force, timeout=timeout,
                                     step_timeout=step_timeout)
        engine = f"deployment, SuperLink {superlink}"
    else:
        files: list[PartyFiles] = []
        for name, model, data in listed:
            state = (state_root / name) if state_root is not None else None
            own = PartyFiles(name, model, data, state_dir=state, budget=budget)
            # the party's own fused model stays with the party (its BatchNorm statistics come from its private rows)
            files.append(dataclasses.replace(own, fused_out=own.state / "fused.safetensors"))
        check_parties(files)  # before the run folder exists: bad input leaves nothing behind
        folder = RunFolder(out, cfg, resume=resume, force=force)
        res = run_fusion_flower(files, cfg, engine=engine, out_dir=folder.path, calib=calib,  # type: ignore[arg-type]
                                timeout_s=timeout, step_timeout_s=step_timeout)
    metrics: dict[str, Any] = {"parties": res.parties, "excluded": [vars(e) for e in res.excluded]}
    if test is not None:
        if res.model is None:
            raise ConfigError("--test needs the fused model: its BatchNorm statistics need --calib")
        x, y = load_party_data(test, model=res.model, need_labels=True)
        assert y is not None
        metrics["fused test accuracy"] = accuracy(res.model, x, y)
    folder.log_metrics("flower", metrics)
    excluded = markdown_table([vars(e) for e in res.excluded]) if res.excluded else "none\n"
    privacy_md = (folder.path / "privacy.md").read_text(encoding="utf-8")
    acc = f"{metrics['fused test accuracy']:.4f}" if "fused test accuracy" in metrics else "not measured (no --test)"
    folder.write_report(
        f"# PrivFusion on Flower ({engine} engine)\n\nFused parties: {', '.join(res.parties)} (reference "
        f"{res.result.get('reference')}); fused test accuracy: {acc}.\n\n## Left out\n\n{excluded}\n"
        + privacy_md)
    folder.mark_done("flower", metrics)
    typer.echo(f"fused {len(res.parties)} parties: {', '.join(res.parties)}; left out: "
               + ("; ".join(f"{e.party} at {e.step}: {e.reason}" for e in res.excluded) or "none"))
    if "fused test accuracy" in metrics:
        typer.echo(f"fused test accuracy: {metrics['fused test accuracy']:.4f}")
    _echo_spent(res.ledgers)
    typer.echo(f"run folder: {folder.path}")
    _warn_if_seeded(cfg)


def _submit_fusion(cfg: FusionConfig, superlink: str, root_certificates: Path | None, *, insecure: bool,
                   num_parties: int | None, out: Path, calib: Path | None, resume: bool, force: bool, timeout: float,
                   step_timeout: float) -> tuple[RunFolder, FlowerFusionResult]:
    """Submit the fusion to the SuperLink at ``superlink`` (checked before the run folder is made): the run
    folder and the hub's result."""
    from pluribus.deploy.address import check_superlink, choose_tls, parse_address
    from pluribus.deploy.submit import submit_fusion
    from pluribus.errors import ConfigError
    from pluribus.runs import RunFolder

    if num_parties is None or num_parties < 2:
        raise ConfigError(f"--parties: with --superlink, how many parties joined (at least 2), got {num_parties}")
    address = parse_address(superlink)
    ca = choose_tls(address, root_certificates, insecure=insecure)
    check_superlink(address, ca=ca)
    folder = RunFolder(out, cfg, resume=resume, force=force)
    return folder, submit_fusion(cfg, address, ca=ca, num_parties=num_parties, out_dir=folder.path, calib=calib,
                                 timeout_s=timeout, step_timeout_s=step_timeout)


@app.command()
def mechanisms(
    epsilon: float = typer.Option(1.0, help="Per-scalar epsilon."),
    clip: float = typer.Option(1.0, help="Values are clipped to [-clip, clip]."),
    delta: float = typer.Option(1e-5, help="Delta of the Gaussian mechanism."),
) -> None:
    """Print each LDP mechanism's noise standard deviation (at input 0 and worst case) at ``epsilon``."""
    import torch

    from pluribus.eval.report import markdown_table
    from pluribus.fusion.privacy.ldp import MECHANISMS, make_mechanism

    grid = torch.linspace(-clip, clip, 201)
    rows = []
    for name in MECHANISMS:
        mech = make_mechanism(name, epsilon, lo=-clip, hi=clip, delta=delta)
        var = mech.variance(grid)
        rows.append({"mechanism": name, "delta": f"{mech.delta:g}", "std at 0": float(var[100]) ** 0.5,
                     "worst-case std": float(var.max()) ** 0.5})
    typer.echo(markdown_table(rows))
