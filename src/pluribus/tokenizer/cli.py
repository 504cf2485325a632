"""`pluribus tokenize fit|encode|eval`: the U2QT tokenizer on the data layer's formats."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pluribus.config import set_threads

app = typer.Typer(help="U2QT: multi-view RQ-VAE user tokenizer (fit, encode, eval).", no_args_is_help=True)
_log = Console(stderr=True)  # progress and notes
_out = Console()  # results: report tables, where the output went

DATA_HELP = "movielens-100k, synthetic[:N], a data set folder or a .jsonl file."
TRAIN_CHECKPOINT = "tokenizer-train"
REPORT_SAMPLE = 8192  # users of a --vectors folder the metrics are computed on
THREADS_HELP = "torch CPU threads; the tokenizer's small MLPs train fastest on 1, and more threads can be far slower on a busy machine."


def _cache_dir(cache_dir: Path | None) -> Path:
    from pluribus.data.locate import data_home

    return cache_dir if cache_dir is not None else data_home() / "embeddings"


@app.command()
def fit(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    out: Path = typer.Option(Path("runs/tokenizer"), help="Run folder (config.toml, tokenizer/, metrics.json, report.md)."),
    config: Path | None = typer.Option(None, help="TOML with top-level keys and [tokenizer] / [embed] tables."),
    epochs: int | None = typer.Option(None, help="Override tokenizer.epochs."),
    layout: str | None = typer.Option(None, help="Override tokenizer.layout: stacked or union."),
    holdout: float | None = typer.Option(None, help="Fraction of users held out for the metrics (not trained on)."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache (default $PLURIBUS_DATA_DIR/embeddings)."),
    seed: int | None = typer.Option(None, help="Override tokenizer.seed."),
    vectors: bool = typer.Option(False, "--vectors", help="DATA is a folder of Parquet stage-1 vectors (user_id + one "
                                 "fixed-size float list per source), read in batches; no stage 1, no held-out split."),
    checkpoint_every: int = typer.Option(10, min=1, help="Save the training state every N epochs (resume point)."),
    threads: int = typer.Option(1, help=THREADS_HELP),
    force: bool = typer.Option(False, "--force", help="Start the run folder over even if it holds another run."),
) -> None:
    """Embed the data's sources (cached), fit the tokenizer on training users, report metrics on held-out users.

    Rerunning with the same options and --out resumes: a finished run is not retrained, an interrupted one
    continues from its last epoch checkpoint.
    """
    set_threads(threads)
    from pluribus.config import load_config
    from pluribus.data.split import split_indices
    from pluribus.data.store import load_user_data
    from pluribus.runs import RunFolder
    from pluribus.tokenizer.config import TokenizeRunConfig
    from pluribus.tokenizer.embed import embed_dataset
    from pluribus.tokenizer.estimator import UserTokenizer
    from pluribus.tokenizer.metrics import tokenizer_report
    from pluribus.tokenizer.train import TrainState

    run_cfg = load_config(TokenizeRunConfig, config) if config is not None else TokenizeRunConfig(data=data)
    tok_over: dict[str, Any] = {k: v for k, v in {"epochs": epochs, "layout": layout, "seed": seed}.items() if v is not None}
    if tok_over:
        run_cfg = dataclasses.replace(run_cfg, tokenizer=dataclasses.replace(run_cfg.tokenizer, **tok_over))
    if holdout is not None:
        run_cfg = dataclasses.replace(run_cfg, holdout=holdout)
    if config is None or data != "movielens-100k":
        run_cfg = dataclasses.replace(run_cfg, data=data)
    if vectors:
        run_cfg = dataclasses.replace(run_cfg, holdout=0.0, include_profile=False)
    ds = None if vectors else load_user_data(run_cfg.data)
    if ds is not None:
        ds.require(needed_by="tokenize fit", sources=True, origin=run_cfg.data)
    run = RunFolder(out, run_cfg, force=force)
    if run.is_done("fit"):
        _log.print(f"{escape(str(run.path))}: a finished run with the same options; not retrained "
                       "(choose another --out, or delete the folder, to refit)")
        _print_report(run.metrics()["heldout"])
        return
    resume = None
    saved = run.load_checkpoint(TRAIN_CHECKPOINT)
    if saved is not None:
        resume = TrainState.from_parts(*saved)
        _log.print(f"resumed from {escape(str(run.checkpoint_path(TRAIN_CHECKPOINT)))} "
                       f"(epoch {resume.epoch} of {run_cfg.tokenizer.epochs})")

    def save_state(state: TrainState) -> None:
        if state.epoch % checkpoint_every == 0 or state.epoch == run_cfg.tokenizer.epochs:
            run.save_checkpoint(TRAIN_CHECKPOINT, state.tensors, state.meta())

    tok = UserTokenizer(run_cfg.tokenizer, embed_config=None if vectors else run_cfg.embed)
    if vectors:
        from pluribus.tokenizer.stream import read_sample

        tok.fit(Path(run_cfg.data), checkpoint=save_state, resume=resume)
        emb = read_sample(Path(run_cfg.data), tok.source_names_, REPORT_SAMPLE)
        name, n_users = Path(run_cfg.data).name, emb.n_users
        train_idx = test_idx = np.arange(emb.n_users)
    else:
        assert ds is not None
        _log.print(f"[bold]{escape(ds.name)}[/bold]: {ds.n_users} users, sources {escape(str(ds.source_names))}")
        emb = embed_dataset(ds, run_cfg.embed, cache_dir=_cache_dir(cache_dir), include_profile=run_cfg.include_profile)
        if run_cfg.holdout > 0:
            train_idx, test_idx = split_indices(ds.n_users, (1 - run_cfg.holdout, run_cfg.holdout), seed=run_cfg.split_seed)
        else:
            train_idx = test_idx = np.arange(ds.n_users)
        tok.fit(emb.subset(train_idx), checkpoint=save_state, resume=resume)
        name, n_users = ds.name, ds.n_users
    tok.save(run.path / "tokenizer")
    report = tokenizer_report(tok, emb.subset(test_idx), usage_data=emb)
    run.log_metrics("heldout", report)
    run.log_metrics("training", {"final": tok.history_[-1], "epochs": len(tok.history_)})
    _plot_loss(run.plot_path("loss"), tok.history_)
    run.write_report(_report_markdown(name, run_cfg, report, len(train_idx), len(test_idx), n_users))
    run.mark_done("fit", {"users_train": len(train_idx), "users_heldout": len(test_idx)})
    _print_report(report)
    _out.print(f"tokenizer saved in [bold]{escape(str(run.path / 'tokenizer'))}[/bold]")


def _load_and_embed(tokenizer: Path, data: str, cache_dir: Path | None) -> tuple[Any, Any]:
    """A saved tokenizer and DATA's stage-1 embeddings for the sources it was fitted on."""
    from pluribus.data.store import load_user_data
    from pluribus.tokenizer.embed import PROFILE_SOURCE, embed_dataset
    from pluribus.tokenizer.estimator import UserTokenizer

    tok = UserTokenizer.load(tokenizer)
    emb = embed_dataset(
        load_user_data(data), tok.embed_config, cache_dir=_cache_dir(cache_dir),
        sources=[s for s in tok.source_names_ if s != PROFILE_SOURCE], include_profile=PROFILE_SOURCE in tok.source_names_,
    )
    return tok, emb


@app.command()
def encode(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    tokenizer: Path = typer.Option(Path("runs/tokenizer/tokenizer"), help="Folder written by `fit` (or save())."),
    out: Path = typer.Option(Path("runs/tokenizer/codes.jsonl"), help="JSONL: user_id, codes [sources][levels], suffix, tokens."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache."),
    threads: int = typer.Option(1, help=THREADS_HELP),
) -> None:
    """Encode every user of DATA into codes and token strings."""
    set_threads(threads)
    from pluribus.io import write_text
    from pluribus.progress import track

    tok, emb = _load_and_embed(tokenizer, data, cache_dir)
    codes = tok.encode(emb)
    suffix = tok.suffix(codes)
    tokens = tok.tokens(codes)
    lines = [
        json.dumps({"user_id": str(u), "codes": codes[i].tolist(), "suffix": int(suffix[i]), "tokens": tokens[i]})
        for i, u in enumerate(track(list(emb.user_ids), description="writing codes"))
    ]
    write_text(out, "\n".join(lines) + "\n")
    _out.print(f"{len(lines)} users -> [bold]{escape(str(out))}[/bold] ({codes.shape[1]} sources x {codes.shape[2]} levels)")


@app.command("eval")
def evaluate(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    tokenizer: Path = typer.Option(Path("runs/tokenizer/tokenizer"), help="Folder written by `fit`."),
    out: Path | None = typer.Option(None, help="Write the metrics as JSON here."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache."),
    threads: int = typer.Option(1, help=THREADS_HELP),
) -> None:
    """Reconstruction, residual norms, codebook usage, collisions and bytes per user on DATA's users."""
    set_threads(threads)
    from pluribus.io import write_json
    from pluribus.tokenizer.metrics import tokenizer_report

    tok, emb = _load_and_embed(tokenizer, data, cache_dir)
    report = tokenizer_report(tok, emb)
    if out is not None:
        write_json(out, report)
    _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    table = Table("source", "recon MSE", "cosine", "relative MSE", title="reconstruction")
    for name, r in report["reconstruction"].items():
        table.add_row(name, f"{r['mse']:.5f}", f"{r['cosine']:.3f}", f"{r['relative_mse']:.3f}")
    _out.print(table)
    usage = Table("level", "part", "size", "usage", "perplexity", "dead", title="codebooks")
    for r in report["codebook_usage"]:
        usage.add_row(str(r["level"]), r["part"], str(r["size"]), f"{r['usage']:.1%}", f"{r['perplexity']:.1f}", str(r["dead"]))
    _out.print(usage)
    c, b = report["collisions"], report["bytes_per_user"]
    _out.print(
        f"collisions: {c['collision_rate']:.2%} (largest bucket {c['largest_bucket']}); "
        f"bytes/user {b['codes']:.0f} vs float32 {b['float32']:.0f} ({b['ratio_float32']:.0f}x) "
        f"and float16 {b['float16']:.0f} ({b['ratio_float16']:.0f}x)"
    )


def _report_markdown(name: str, cfg: Any, report: dict[str, Any], n_train: int, n_test: int, n_users: int) -> str:
    from pluribus.eval.report import markdown_table

    recon = [{"source": k, **{m: round(v, 4) for m, v in r.items()}} for k, r in report["reconstruction"].items()]
    usage = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in report["codebook_usage"]]
    c, b = report["collisions"], report["bytes_per_user"]
    t = cfg.tokenizer
    return "\n\n".join([
        f"# U2QT tokenizer on {name}",
        f"Layout `{t.layout}`, {t.n_shared} shared + {t.n_specific} specific levels, codebooks {t.shared_size} shared / "
        f"{t.specific_size} specific x {t.latent_dim} dims; fitted on {n_train} users. Reconstruction and residuals "
        f"on {n_test} held-out users; codebook usage and collisions on all {n_users} users.",
        "## Reconstruction (held-out users)", markdown_table(recon),
        "## Residual norm per level", ", ".join(f"{v:.3f}" for v in report["residual_norms"]),
        "## Codebook usage (all users)", markdown_table(usage),
        f"## Size and collisions\n\nCollision rate {c['collision_rate']:.2%}, largest bucket {c['largest_bucket']}. "
        f"Bytes per user: {b['codes']:.0f} (codes) vs {b['float32']:.0f} float32 ({b['ratio_float32']:.0f}x) and "
        f"{b['float16']:.0f} float16 ({b['ratio_float16']:.0f}x).",
    ]) + "\n"


def _plot_loss(path: Path, history: list[dict[str, float]]) -> None:
    from pluribus.eval.report import line_plot

    xs = list(range(1, len(history) + 1))
    line_plot(
        path, {k: (xs, [h[k] for h in history]) for k in ("recon", "vq")},
        xlabel="epoch", ylabel="loss", title="tokenizer training",
    )
