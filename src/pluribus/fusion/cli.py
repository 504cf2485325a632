"""`pluribus fuse run`: train parties on a label-skewed split, fuse them under LDP, report privacy and accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="PrivFusion: locally differentially private model fusion.", no_args_is_help=True)


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
    adapter: bool | None = typer.Option(None, "--adapter/--no-adapter", help="Train the perturbation filter adapter."),
    seed: int | None = typer.Option(None, help="Seed of split, partition and training."),
    resume: bool = typer.Option(True, help="Resume a run folder with the same config."),
    threads: int | None = typer.Option(None, help="torch CPU threads (1 is much faster on a busy small machine)."),
) -> None:
    """Train K party models, fuse them with PrivFusion, and write metrics, a report and the privacy ledger."""
    import dataclasses

    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from pluribus.config import load_config
    from pluribus.data.partition import dirichlet_partition
    from pluribus.eval.report import bar_plot, markdown_table
    from pluribus.fusion.accounting import privacy_report, privacy_report_markdown
    from pluribus.fusion.config import AdapterConfig, RunConfig
    from pluribus.fusion.experiment import load_images, model_factory, split_images, train_parties
    from pluribus.fusion.fuse import privfusion
    from pluribus.fusion.models import accuracy, ensemble_accuracy
    from pluribus.io import write_json
    from pluribus.progress import track
    from pluribus.runs import RunFolder

    cfg = load_config(RunConfig, config) if config is not None else RunConfig()
    top: dict[str, Any] = {k: v for k, v in {"dataset": dataset, "parties": parties, "alpha": alpha, "seed": seed}.items() if v is not None}
    fusion_over: dict[str, Any] = {k: v for k, v in {"epsilon": epsilon, "mechanism": mechanism, "solver": solver}.items() if v is not None}
    cfg = dataclasses.replace(cfg, **top, fusion=dataclasses.replace(cfg.fusion, **fusion_over))
    if adapter is not None:
        cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, kind="residual" if adapter else "none"))
    folder = RunFolder(out, cfg, resume=resume)

    x, y = load_images(cfg.dataset)
    split = split_images(x, y, calib_size=cfg.calib_size, seed=cfg.seed)
    parts = dirichlet_partition(split.y_train.numpy(), cfg.parties, alpha=cfg.alpha, seed=cfg.seed)
    factory = model_factory(cfg.model, x.shape[-1], cfg.hidden)
    models = train_parties(factory, split.x_train, split.y_train, parts, same_init=cfg.same_init,
                           epochs=cfg.epochs, seed=cfg.seed, progress=True)
    metrics = {f"party{k}": accuracy(m, split.x_test, split.y_test) for k, m in enumerate(models)}
    metrics["ensemble (upper bound)"] = ensemble_accuracy(models, split.x_test, split.y_test)
    calib = (split.x_calib, split.y_calib)
    results = {}
    for name, adapter_cfg in track(
        [("fused", AdapterConfig(kind="none")), ("fused + adapter", cfg.adapter)], description="fusing"
    ):
        if name == "fused + adapter" and cfg.adapter.kind == "none":
            continue
        results[name] = privfusion(models, config=cfg.fusion, calib=calib, adapter=adapter_cfg,
                                   weights=[float(len(p)) for p in parts])
        metrics[name] = accuracy(results[name].model, split.x_test, split.y_test)
    folder.log_metrics("accuracy", metrics)
    last = results.get("fused + adapter", results["fused"])
    write_json(folder.path / "privacy.json", privacy_report(last.ledgers))
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
        + "\n\n" + privacy_report_markdown(last.ledgers)
    )
    folder.write_report(report)
    folder.mark_done("run", {"accuracy": metrics})
    typer.echo(markdown_table([{"model": k, "test accuracy": v} for k, v in metrics.items()]))
    typer.echo(f"run folder: {folder.path}")


@app.command()
def mechanisms(
    epsilon: float = typer.Option(1.0, help="Per-scalar epsilon."),
    clip: float = typer.Option(1.0, help="Values are clipped to [-clip, clip]."),
    delta: float = typer.Option(1e-5, help="Delta of the Gaussian mechanism."),
) -> None:
    """Print each LDP mechanism's noise standard deviation (at input 0 and worst case) at ``epsilon``."""
    import torch

    from pluribus.eval.report import markdown_table
    from pluribus.fusion.ldp import MECHANISMS, make_mechanism

    grid = torch.linspace(-clip, clip, 201)
    rows = []
    for name in MECHANISMS:
        mech = make_mechanism(name, epsilon, lo=-clip, hi=clip, delta=delta)
        var = mech.variance(grid)
        rows.append({"mechanism": name, "delta": f"{mech.delta:g}", "std at 0": float(var[100]) ** 0.5,
                     "worst-case std": float(var.max()) ** 0.5})
    typer.echo(markdown_table(rows))
