"""`pluribus encoder train | embed | eval`: run folders with config.toml, checkpoints, metrics and a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from pluribus.encoder.config import GGSMConfig
from pluribus.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from pluribus.data.schema import UserDataset
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.pairs import PairSet
    from pluribus.encoder.train import TrainResult

app = typer.Typer(help="GGSM: decoder-only LLM user encoder with soft attention masks.", no_args_is_help=True)


@app.command()
def train(
    out: Path = typer.Option(Path("runs/encoder"), help="Run folder (a rerun with the same config resumes)."),
    config: Path | None = typer.Option(None, help="TOML file with [pairs], [encoder], [schedule], [train]."),
    data: str | None = typer.Option(None, help="movielens-100k, synthetic[:N], a data set folder or .jsonl."),
    model: str | None = typer.Option(None, help="Hub id, local folder, smollm2-135m (packaged GGUF), or "
                                                "tiny-random (a tiny random decoder made locally: runs in seconds, "
                                                "has learned nothing)."),
    policy: str | None = typer.Option(None, help="causal | hybrid | bidirectional | scheduler | ggsm."),
    steps: int | None = typer.Option(None, help="Optimizer steps (also the schedule's total)."),
    batch_size: int | None = typer.Option(None, help="Micro-batch size."),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step."),
    piece_size: int | None = typer.Option(
        None, help="Inputs encoded at once inside a micro-batch (gradient cache: the same gradients and in-batch "
                   "negatives as one pass, with one piece's activations in memory). Default: the whole micro-batch."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute layer activations in the backward pass (far less memory, ~1/3 more compute). Default: on "
             "only where the memory estimate without it does not fit."),
    lr: float | None = typer.Option(None, help="AdamW learning rate."),
    max_length: int | None = typer.Option(None, help="Max tokens per input (longer inputs keep the last ones)."),
    max_events: int | None = typer.Option(None, help="Most recent events rendered per user."),
    source: str | None = typer.Option(
        None, help="Source to train on (default: the data's only source with a held-out future, else its only "
                   "source; several: name one)."),
    future_last: int | None = typer.Option(
        None, help="Hold out each user's last K events of the source as 'the future' (data without a held-out "
                   "future; default K = pairs.future_events)."),
    future_after: str | None = typer.Option(
        None, help="Hold out the events at or after this time (seconds since the epoch or an ISO 8601 date) as "
                   "'the future'."),
    force: bool = typer.Option(False, "--force", help="Start the run folder over, whatever it holds."),
) -> None:
    """Train an encoder contrastively (history vs future) and write checkpoints, metrics and a report.

    Before the run folder is written, the training memory is estimated and checked against MemAvailable (capped by
    $PLURIBUS_MEMORY_LIMIT, e.g. 6GiB): a setting that cannot fit stops with one line (exit 2)."""
    import dataclasses

    from pluribus.config import load_config
    from pluribus.encoder.distributed import barrier, check_divisible, init_from_env
    from pluribus.encoder.model import UserEncoder
    from pluribus.encoder.train import CHECKPOINT, train_encoder
    from pluribus.eval.report import line_plot
    from pluribus.runs import RunFolder, check_run_location

    cfg = load_config(GGSMConfig, config) if config is not None else GGSMConfig()
    cfg = _override(cfg, data=data, model=model, policy=policy, steps=steps, batch_size=batch_size,
                    grad_accum=grad_accum, lr=lr, max_length=max_length, max_events=max_events, source=source,
                    future_last=future_last, future_after=future_after, piece_size=piece_size,
                    gradient_checkpointing=gradient_checkpointing)
    # the data is read (and the source and future resolved into the config) before the run folder exists: bad
    # data leaves nothing behind, and config.toml records what was trained on
    asked_future = cfg.pairs.future_last is not None or cfg.pairs.future_after is not None
    cfg, ds = _prepared(cfg, strict=True)
    rank, size = init_from_env()  # torchrun: join the process group; one process: (0, 1)
    check_divisible(cfg.train.batch_size, size)
    import torch

    # the encoder is built (and its mask self-check run) before the run folder exists: a backbone that cannot take
    # the policy's mask is refused in one line and leaves nothing behind
    if rank == 0:
        check_run_location(out)  # a bad --out is refused before the backbone is loaded
    torch.manual_seed(cfg.train.seed)  # the head's random init: reproducible, and the same on every rank
    encoder = UserEncoder(cfg.encoder)
    if cfg.schedule.policy != "causal" and (problem := encoder.future_attention_problem()) is not None:
        raise ConfigError(f"policy {cfg.schedule.policy!r} gives later tokens weight, which this backbone cannot "
                          f"honour: {problem}")
    from pluribus.encoder.memory import prepare_training_memory

    # checkpointing set up (and proven) and the memory estimate checked before anything is written
    prepare_training_memory(encoder, cfg.train, world_size=size)
    if rank == 0:
        run = RunFolder(out, cfg, force=force)
        if cfg.pairs.future_last is not None and not asked_future:
            # said only once the run is accepted: a refused command prints its one error line and nothing else
            typer.echo(f"{ds.name}: no held-out future for {cfg.pairs.source!r}; holding out each user's last "
                       f"{cfg.pairs.future_last} events as the future (choose with --future-last or "
                       "--future-after)", err=True)
    barrier()
    if rank != 0:
        run = RunFolder(out)  # rank 0 wrote (or checked) the config; the others only read checkpoints
    from pluribus.encoder.pairs import split_pairs

    train_pairs, heldout = split_pairs(_build(cfg, ds), cfg.pairs.heldout, seed=cfg.pairs.split_seed)
    result, schedule = train_encoder(encoder, train_pairs, cfg.schedule, cfg.train, run=run)
    if rank != 0:
        return
    if result.resumed_from:
        done = " (already finished: nothing retrained)" if result.resumed_from >= cfg.train.steps else ""
        typer.echo(f"resumed from {run.path / 'checkpoints' / CHECKPOINT} at step {result.resumed_from} of "
                   f"{cfg.train.steps}{done}", err=True)
    collapse = _collapse_verdict(encoder, train_pairs, schedule, result)
    memory = _memory_line(result)
    run.log_metrics("train", {
        "memory_estimate": result.memory.as_dict() if result.memory is not None else None,
        "peak_rss_bytes": _peak_rss(),
        "steps": result.steps, **result.diagnostics(), "nonfinite_steps": result.nonfinite_steps,
        "pairs": len(train_pairs), "heldout_users": len(heldout) if heldout is not None else 0,
        "resumed_from": result.resumed_from, "chance_loss": result.chance_loss,
        "collapsed": result.collapsed or collapse is not None, "collapse": collapse, "ranks": size,
    })
    xs = list(range(1, len(result.losses) + 1))
    line_plot(run.plot_path("loss"), {"InfoNCE": (xs, result.losses), "chance ln B": (xs, [result.chance_loss] * len(xs))},
              xlabel="optimizer step", ylabel="loss", title=f"GGSM training ({cfg.schedule.policy})")
    line_plot(run.plot_path("diagnostics"), {k: (xs, getattr(result, k)) for k in
                                             ("anchor_cosine", "positive_cosine", "advantage", "top1")},
              xlabel="optimizer step", ylabel="value", title="batch diagnostics")
    line_plot(run.plot_path("future_weight"), {"mean future weight": (xs, result.future_weights)},
              xlabel="optimizer step", ylabel="weight", title="attention to future tokens")
    run.write_report(
        f"# Encoder training\n\npolicy `{cfg.schedule.policy}`, model `{cfg.encoder.model}`, positive "
        f"`{cfg.pairs.positive}`, {len(train_pairs)} training pairs, {result.steps} steps on {size} rank(s); "
        f"final loss {result.losses[-1]:.4f}; non-finite steps {result.nonfinite_steps}.\n\n"
        f"Mask self-check: {encoder.mask_check_summary()}.\n\n{memory}\n\n{result.summary()}\n\n"
        + (f"**Collapsed**: {collapse}.\n\n" if collapse is not None else "")
        + _diagnostics_table(result) + "\n"
        "![loss](loss.png) ![diagnostics](diagnostics.png) ![future weight](future_weight.png)\n\n"
        f"Config: {json.dumps(dataclasses.asdict(cfg), default=str)}\n"
    )
    typer.echo(f"trained {result.steps} steps, final loss {result.losses[-1]:.4f} (chance {result.chance_loss:.4f})"
               f"{'; COLLAPSED' if result.collapsed or collapse else ''}; run folder {out}")
    if collapse is not None:  # a finished run whose embeddings tell no users apart is a failure, not a result
        import click

        raise click.ClickException(f"encoder training collapsed: {collapse} (run folder and report written: "
                                   f"{out / 'report.md'})")  # one line, exit 1


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _memory_line(result: TrainResult) -> str:
    """The report's memory sentence: the estimate checked before training, and the peak resident memory."""
    from pluribus.encoder.memory import size_text

    peak = f"peak resident memory of this process {size_text(_peak_rss())}"
    if result.memory is None:
        return f"Memory: {peak}."
    return f"Memory: estimated {size_text(result.memory.total)} ({result.memory.describe()}); {peak}."


def _collapse_verdict(encoder: UserEncoder, pairs: PairSet, schedule: Any, result: TrainResult) -> str | None:
    """Why the trained encoder's embeddings of (up to 256) training users are collapsed (zero-norm, non-finite or
    near-identical), or the training diagnostics' collapse verdict, or None."""
    from pluribus.encoder.metrics import embedding_collapse

    users = list(pairs.anchors[:256])
    weight = schedule.future_weights() if encoder.config.inference_mask == "schedule" else None
    verdict = embedding_collapse(encoder.encode(users, future_weight=weight, progress=False))
    if verdict is None and result.collapsed:
        verdict = "the loss sits at chance while all embeddings point the same way"
    return verdict


def _prepared(cfg: GGSMConfig, data: str | None = None, *, strict: bool = False) -> tuple[GGSMConfig, UserDataset]:
    """The config with its source resolved, and the data with the configured future held out of the history.

    ``strict`` (training): refuse ``future_last`` / ``future_after`` on data that holds out a future of its own.
    """
    import dataclasses

    from pluribus.data.store import load_user_data

    ds = load_user_data(data or cfg.pairs.data)
    source = _choose_source(ds, cfg.pairs.source)
    has_future = source in ds.future and not ds.future[source].empty
    pairs = cfg.pairs
    asked = pairs.future_last is not None or pairs.future_after is not None
    if has_future:
        if strict and asked:
            raise ConfigError(f"data set {ds.name!r} already holds out a future for source {source!r}; "
                              "drop --future-last / --future-after (pairs.future_last / pairs.future_after)")
    elif asked or pairs.positive in ("future", "future_events"):
        if not asked:
            pairs = dataclasses.replace(pairs, future_last=pairs.future_events)
        from pluribus.encoder.pairs import hold_out_future

        ds = hold_out_future(ds, source, pairs.future_last, pairs.future_after)
    return dataclasses.replace(cfg, pairs=dataclasses.replace(pairs, source=source)), ds


def _choose_source(ds: UserDataset, source: str | None) -> str:
    names = list(ds.source_names)
    if source is not None:
        if source not in ds.sources:
            raise ConfigError(f"--source {source!r} is not a source of data set {ds.name!r}; sources: {names}")
        return source
    with_future = [n for n in names if n in ds.future and not ds.future[n].empty]
    candidates = with_future if len(with_future) == 1 else names
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConfigError(f"data set {ds.name!r} has no sources; the encoder needs a source of events")
    raise ConfigError(f"data set {ds.name!r} has several sources {names}; choose one with --source (pairs.source)")


def _diagnostics_table(result: TrainResult, rows: int = 8) -> str:
    from pluribus.eval.report import markdown_table

    n = len(result.losses)
    picks = sorted({min(n - 1, round(i * (n - 1) / max(rows - 1, 1))) for i in range(rows)})
    return markdown_table([
        {"step": i + 1, "loss": result.losses[i], "lr": result.lrs[i], "anchor cos": result.anchor_cosine[i],
         "positive cos": result.positive_cosine[i], "advantage": result.advantage[i], "top-1": result.top1[i]}
        for i in picks if i < len(result.lrs)
    ])


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

    ds, ids, x, _, _ = _embed(run, data)

    save_tensors(target, {"embeddings": torch.from_numpy(x)}, metadata={"user_ids": json.dumps(ids)})
    typer.echo(f"wrote {x.shape[0]} x {x.shape[1]} embeddings to {target}")


@app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="A run folder written by `pluribus encoder train`."),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks (default: all classification tasks)."),
    data: str | None = typer.Option(None, help="Data to evaluate on (default: the run's data)."),
) -> None:
    """Held-out retrieval (Recall@1/10, MRR) and linear probes (AUC mean ± std over seeds) of a trained encoder."""
    from pluribus.encoder.metrics import heldout_retrieval
    from pluribus.encoder.pairs import split_pairs
    from pluribus.eval.probes import probe_tasks
    from pluribus.eval.report import markdown_table
    from pluribus.runs import RunFolder

    ds, _, x, encoder, cfg = _embed(run, data)
    folder = RunFolder(run)
    text = ""
    if cfg.pairs.heldout > 0 and data is None:
        _, heldout = split_pairs(_build(cfg, ds), cfg.pairs.heldout, seed=cfg.pairs.split_seed)
        assert heldout is not None
        retrieval = heldout_retrieval(encoder, heldout, progress=False)
        folder.log_metrics("retrieval", retrieval)
        text += (f"## Held-out retrieval\n\n{int(retrieval['users'])} held-out users: is each user's true "
                 f"`{cfg.pairs.positive}` positive the closest among all of theirs?\n\n"
                 + markdown_table([retrieval]) + "\n")
    else:
        text += "## Held-out retrieval\n\nnot measured (pairs.heldout = 0, or --data is another data set)\n\n"
    results = probe_tasks(x, ds, tasks.split(",") if tasks else None)
    rows = [{"task": t, **r.as_dict()} for t, r in results.items()]
    folder.log_metrics("probe", {t: r.as_dict() for t, r in results.items()})
    text += "## Linear probes\n\n" + markdown_table(rows) + "\n"
    folder.write_report((run / "report.md").read_text(encoding="utf-8") + "\n" + text
                        if (run / "report.md").exists() else "# Encoder evaluation\n\n" + text)
    typer.echo(text)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run folder written by `pluribus encoder train`."),
    out: Path = typer.Argument(..., help="Folder to write (UserEncoder.from_pretrained loads it)."),
    merged: bool = typer.Option(False, help="Store the full backbone with LoRA merged instead of adapter files."),
    sentence_transformers: Path | None = typer.Option(
        None, help="Also write a sentence-transformers folder here (refused where the backbone cannot express the "
                   "encoder's mask natively, or reads other tokens)."),
    force: bool = typer.Option(False, "--force", help="Overwrite target folders that already hold files."),
) -> None:
    """Export a trained encoder as a self-contained folder (peft adapter, tokenizer, head, mask, schedule)."""
    from pluribus.encoder.export import export_sentence_transformers
    from pluribus.encoder.saving import refuse_occupied
    from pluribus.encoder.train import load_encoder_run

    # both targets are checked before anything is written, and the export that can be refused (the measured
    # sentence-transformers one) runs first: a refusal leaves nothing behind
    for target, what in ((out, "a saved encoder"), (sentence_transformers, "a sentence-transformers export")):
        if target is not None:
            refuse_occupied(target, what, overwrite=force)
    encoder, _, schedule = load_encoder_run(run, merge=False)
    if sentence_transformers is not None:
        written = export_sentence_transformers(encoder, sentence_transformers, overwrite=force)
        typer.echo(f"wrote {written} (load with SentenceTransformer; same embeddings, checked on short inputs and "
                   f"inputs at and beyond max_length={encoder.max_length})")
    encoder.save_pretrained(out, schedule=schedule, merged=merged, overwrite=force)
    typer.echo(f"wrote {out} (load with UserEncoder.from_pretrained)")


def _build(cfg: GGSMConfig, ds: UserDataset) -> PairSet:
    from pluribus.encoder.pairs import build_pairs

    assert cfg.pairs.source is not None, "resolved by _prepared"
    return build_pairs(ds, source=cfg.pairs.source, positive=cfg.pairs.positive, max_events=cfg.pairs.max_events,
                       future_events=cfg.pairs.future_events, query=cfg.pairs.query, seed=cfg.train.seed)


def _embed(run: Path, data: str | None) -> tuple[UserDataset, list[str], np.ndarray, UserEncoder, GGSMConfig]:
    from pluribus.encoder.pairs import user_inputs
    from pluribus.encoder.train import load_encoder_run

    encoder, cfg, _ = load_encoder_run(run)
    cfg, ds = _prepared(cfg, data)
    assert cfg.pairs.source is not None, "resolved by _prepared"
    from pluribus.encoder.metrics import embedding_collapse

    ids, items = user_inputs(ds, source=cfg.pairs.source, max_events=cfg.pairs.max_events)
    x = encoder.encode(items)
    collapse = embedding_collapse(x)
    if collapse is not None:
        typer.echo(f"warning: these embeddings are collapsed: {collapse}; they tell no users apart", err=True)
    return ds, ids, x, encoder, cfg


def _override(cfg: GGSMConfig, **values: Any) -> GGSMConfig:
    pairs = {k: values[k] for k in ("data", "max_events", "source", "future_last", "future_after")
             if values.get(k) is not None}
    enc = {k: values[k] for k in ("model", "max_length") if values.get(k) is not None}
    train = {k: values[k] for k in ("steps", "batch_size", "grad_accum", "lr", "piece_size", "gradient_checkpointing")
             if values.get(k) is not None}
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
