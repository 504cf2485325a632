"""`pluribus encoder train | embed | eval`: run folders with config.toml, checkpoints, metrics and a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from pluribus.encoder.config import GGSMConfig

if TYPE_CHECKING:
    import numpy as np

    from pluribus.data.schema import UserDataset

app = typer.Typer(help="GGSM: decoder-only LLM user encoder with soft attention masks.", no_args_is_help=True)


@app.command()
def train(
    out: Path = typer.Option(Path("runs/encoder"), help="Run folder (a rerun with the same config resumes)."),
    config: Path | None = typer.Option(None, help="TOML file with [pairs], [encoder], [schedule], [train]."),
    data: str | None = typer.Option(None, help="movielens-100k, synthetic[:N], a data set folder or .jsonl."),
    model: str | None = typer.Option(None, help="Hub id, local folder, or smollm2-135m (packaged GGUF)."),
    policy: str | None = typer.Option(None, help="causal | hybrid | bidirectional | scheduler | ggsm."),
    steps: int | None = typer.Option(None, help="Optimizer steps (also the schedule's total)."),
    batch_size: int | None = typer.Option(None, help="Micro-batch size."),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step."),
    lr: float | None = typer.Option(None, help="AdamW learning rate."),
    max_length: int | None = typer.Option(None, help="Max tokens per input (longer inputs keep the last ones)."),
    max_events: int | None = typer.Option(None, help="Most recent events rendered per user."),
) -> None:
    """Train an encoder contrastively (history vs future) and write checkpoints, metrics and a report."""
    import dataclasses

    from pluribus.config import load_config
    from pluribus.data.store import load_user_data
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.pairs import build_pairs
    from pluribus.encoder.train import train_encoder
    from pluribus.eval.report import line_plot
    from pluribus.runs import RunFolder

    cfg = load_config(GGSMConfig, config) if config is not None else GGSMConfig()
    cfg = _override(cfg, data=data, model=model, policy=policy, steps=steps, batch_size=batch_size,
                    grad_accum=grad_accum, lr=lr, max_length=max_length, max_events=max_events)
    run = RunFolder(out, cfg)
    ds = load_user_data(cfg.pairs.data)
    pairs = build_pairs(ds, source=cfg.pairs.source, positive=cfg.pairs.positive, max_events=cfg.pairs.max_events,
                        query=cfg.pairs.query, seed=cfg.train.seed)
    encoder = UserEncoder(cfg.encoder)
    result, schedule = train_encoder(encoder, pairs, cfg.schedule, cfg.train, run=run)
    run.log_metrics("train", {
        "steps": result.steps, "losses": result.losses, "mean_future_weight": result.future_weights,
        "nonfinite_steps": result.nonfinite_steps, "pairs": len(pairs), "resumed_from": result.resumed_from,
    })
    xs = list(range(1, len(result.losses) + 1))
    line_plot(run.plot_path("loss"), {"InfoNCE": (xs, result.losses)}, xlabel="optimizer step", ylabel="loss",
              title=f"GGSM training ({cfg.schedule.policy})")
    line_plot(run.plot_path("future_weight"), {"mean future weight": (xs, result.future_weights)},
              xlabel="optimizer step", ylabel="weight", title="attention to future tokens")
    run.write_report(
        f"# Encoder training\n\npolicy `{cfg.schedule.policy}`, model `{cfg.encoder.model}`, {len(pairs)} pairs, "
        f"{result.steps} steps; final loss {result.losses[-1]:.4f}; non-finite steps {result.nonfinite_steps}.\n\n"
        f"![loss](loss.png) ![future weight](future_weight.png)\n\n"
        f"Config: {json.dumps(dataclasses.asdict(cfg), default=str)}\n"
    )
    typer.echo(f"trained {result.steps} steps, final loss {result.losses[-1]:.4f}; run folder {out}")


@app.command()
def embed(
    run: Path = typer.Option(..., help="A run folder written by `pluribus encoder train`."),
    out: Path | None = typer.Option(None, help="Output safetensors (default <run>/embeddings.safetensors)."),
    data: str | None = typer.Option(None, help="Data to embed (default: the run's data)."),
) -> None:
    """Embed every user of a data set with a trained encoder (L2-normalised, bidirectional inference)."""
    target = out or run / "embeddings.safetensors"
    import torch

    from pluribus.io import save_tensors

    ds, ids, x = _embed(run, data)

    save_tensors(target, {"embeddings": torch.from_numpy(x)}, metadata={"user_ids": json.dumps(ids)})
    typer.echo(f"wrote {x.shape[0]} x {x.shape[1]} embeddings to {target}")


@app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="A run folder written by `pluribus encoder train`."),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks (default: all classification tasks)."),
    data: str | None = typer.Option(None, help="Data to evaluate on (default: the run's data)."),
) -> None:
    """Linear-probe the frozen embeddings on the data set's tasks (AUC mean ± std over seeds)."""
    from pluribus.eval.probes import probe_tasks
    from pluribus.eval.report import markdown_table
    from pluribus.runs import RunFolder

    ds, _, x = _embed(run, data)
    results = probe_tasks(x, ds, tasks.split(",") if tasks else None)
    rows = [{"task": t, **r.as_dict()} for t, r in results.items()]
    folder = RunFolder(run)
    folder.log_metrics("probe", {t: r.as_dict() for t, r in results.items()})
    table = markdown_table(rows)
    folder.write_report((run / "report.md").read_text(encoding="utf-8") + "\n## Linear probes\n\n" + table + "\n"
                        if (run / "report.md").exists() else "# Encoder evaluation\n\n" + table + "\n")
    typer.echo(table)


def _embed(run: Path, data: str | None) -> tuple[UserDataset, list[str], np.ndarray]:
    from pluribus.data.store import load_user_data
    from pluribus.encoder.pairs import user_inputs
    from pluribus.encoder.train import load_encoder_run

    encoder, cfg, _ = load_encoder_run(run)
    ds = load_user_data(data or cfg.pairs.data)
    ids, items = user_inputs(ds, source=cfg.pairs.source, max_events=cfg.pairs.max_events)
    return ds, ids, encoder.encode(items)


def _override(cfg: GGSMConfig, **values: Any) -> GGSMConfig:
    pairs = {k: values[k] for k in ("data", "max_events") if values.get(k) is not None}
    enc = {k: values[k] for k in ("model", "max_length") if values.get(k) is not None}
    train = {k: values[k] for k in ("steps", "batch_size", "grad_accum", "lr") if values.get(k) is not None}
    sched: dict[str, object] = {}
    if values.get("policy") is not None:
        sched["policy"] = values["policy"]
    if values.get("steps") is not None:
        sched["total_steps"] = values["steps"]
    from pluribus.config import config_from_dict, config_to_dict

    data = config_to_dict(cfg)
    for section, upd in (("pairs", pairs), ("encoder", enc), ("train", train), ("schedule", sched)):
        data.setdefault(section, {}).update(upd)
    return config_from_dict(GGSMConfig, data, source="command line")
