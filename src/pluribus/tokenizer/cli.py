"""`pluribus tokenize fit|encode|decode|eval`: the U2QT tokenizer on the data layer's formats."""

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
from pluribus.errors import DataError
from pluribus.tokenizer.config import MAX_EPOCHS

app = typer.Typer(help="U2QT: multi-view RQ-VAE user tokenizer (fit, encode, decode, eval).", no_args_is_help=True)
_log = Console(stderr=True)  # progress and notes
_out = Console()  # results: report tables, where the output went

DATA_HELP = "movielens-100k, synthetic[:N], a data set folder or a .jsonl file."
TRAIN_CHECKPOINT = "tokenizer-train"
REPORT_SAMPLE = 8192  # users of a --vectors folder the metrics are computed on
THREADS_HELP = "torch CPU threads; the tokenizer's small MLPs train fastest on 1, and more threads can be far slower on a busy machine."
EMBED_BACKEND_HELP = ("Stage 1 runtime of the sentence-transformers model: torch (float32), onnx, onnx-int8, openvino or "
                      "openvino-bf16 (docs/results/tokenizer.md, Faster stage 1); part of the cache key and the embedder name.")


def _cache_dir(cache_dir: Path | None) -> Path:
    from pluribus.data.locate import data_home

    return cache_dir if cache_dir is not None else data_home() / "embeddings"


@app.command()
def fit(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    out: Path = typer.Option(Path("runs/tokenizer"), help="Run folder (config.toml, tokenizer/, metrics.json, report.md)."),
    config: Path | None = typer.Option(None, help="TOML with top-level keys and [tokenizer] / [embed] tables."),
    epochs: int | None = typer.Option(None, min=1, max=MAX_EPOCHS, help="Override tokenizer.epochs."),
    layout: str | None = typer.Option(None, help="Override tokenizer.layout: stacked or union."),
    backend: str | None = typer.Option(None, help="Override tokenizer.backend: rqvae (the multi-view RQ-VAE) or "
                                       "rq-kmeans (residual k-means, no training loop; see docs/guides/tokenizer.md)."),
    balanced: bool | None = typer.Option(None, "--balanced/--no-balanced", help="Override tokenizer.kmeans_balanced "
                                         "(rq-kmeans: every code takes at most ceil(users / codes) training users)."),
    holdout: float | None = typer.Option(None, help="Fraction of users held out for the metrics (not trained on)."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache (default $PLURIBUS_DATA_DIR/embeddings)."),
    embed_backend: str | None = typer.Option(None, "--embed-backend", help="Override embed.backend. " + EMBED_BACKEND_HELP),
    seed: int | None = typer.Option(None, help="Override tokenizer.seed."),
    vectors: bool = typer.Option(False, "--vectors", help="DATA is a folder of Parquet stage-1 vectors (user_id + one "
                                 "fixed-size float list per source), read in batches; no stage 1, no held-out split."),
    checkpoint_every: int = typer.Option(10, min=1, max=MAX_EPOCHS, help="Save the training state every N epochs "
                                         "(resume point)."),
    refit_from: Path | None = typer.Option(None, help="A saved tokenizer (its folder) to warm-start from: most users "
                                           "keep their codes (see docs/results/tokenizer.md, Refits)."),
    stable: bool = typer.Option(False, "--stable", help="With --refit-from: keep its encoder and codebooks and train "
                                "only the decoder, so users whose inputs did not change keep every code."),
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
    tok_over: dict[str, Any] = {k: v for k, v in {"epochs": epochs, "layout": layout, "seed": seed, "backend": backend,
                                                  "kmeans_balanced": balanced}.items() if v is not None}
    if tok_over:
        run_cfg = dataclasses.replace(run_cfg, tokenizer=dataclasses.replace(run_cfg.tokenizer, **tok_over))
    if holdout is not None:
        run_cfg = dataclasses.replace(run_cfg, holdout=holdout)
    if embed_backend is not None:  # validated by EmbedConfig: an unknown backend is one line, exit 2
        embed_cfg = dataclasses.replace(run_cfg.embed, backend=embed_backend)  # type: ignore[arg-type]
        run_cfg = dataclasses.replace(run_cfg, embed=embed_cfg)
    if not vectors and run_cfg.embed.backend is not None:  # a missing package: one line before anything is written
        from pluribus.tokenizer.backends import require_backend

        require_backend(run_cfg.embed.backend)
    if refit_from is not None or stable:
        run_cfg = dataclasses.replace(run_cfg, refit_from=str(refit_from or run_cfg.refit_from),
                                      stable=stable or run_cfg.stable)
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
        done = run.metrics()
        section = "heldout" if "heldout" in done else "trained_users"
        _print_report(done[section], _REPORT_TITLES[section])
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
    previous = UserTokenizer.load(run_cfg.refit_from) if run_cfg.refit_from else None
    refit: dict[str, Any] = {"warm_start": previous, "stable": run_cfg.stable}
    if vectors:
        from pluribus.tokenizer.stream import read_sample

        tok.fit(Path(run_cfg.data), checkpoint=save_state, resume=resume, **refit)
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
        tok.fit(emb.subset(train_idx), checkpoint=save_state, resume=resume, **refit)
        name, n_users = ds.name, ds.n_users
    tok.save(run.path / "tokenizer")
    report = tokenizer_report(tok, emb.subset(test_idx), usage_data=emb)
    section = "heldout" if run_cfg.holdout > 0 else "trained_users"  # no held-out split: say whose metrics these are
    run.log_metrics(section, report)
    # rq-kmeans records one entry per level (no epochs), and none at all for a stable refit
    steps = "levels" if run_cfg.tokenizer.backend == "rq-kmeans" else "epochs"
    run.log_metrics("training", {"final": tok.history_[-1] if tok.history_ else None, steps: len(tok.history_)})
    if tok.history_:
        _plot_loss(run.plot_path("loss"), tok.history_, xlabel="level" if steps == "levels" else "epoch")
    run.write_report(_report_markdown(name, run_cfg, report, len(train_idx), len(test_idx), n_users))
    run.mark_done("fit", {"users_train": len(train_idx), "users_heldout": len(test_idx) if run_cfg.holdout > 0 else 0})
    _print_report(report, _REPORT_TITLES[section])
    _out.print(f"tokenizer saved in [bold]{escape(str(run.path / 'tokenizer'))}[/bold]")


def _load_and_embed(tokenizer: Path, data: str, cache_dir: Path | None, *, vectors: bool = False,
                    embed_backend: str | None = None) -> tuple[Any, Any]:
    """A saved tokenizer and DATA's stage-1 embeddings for the sources it was fitted on (with ``vectors``: the
    first REPORT_SAMPLE users of a vector folder; with ``embed_backend``: refused unless it gives the tokenizer's
    own embedder)."""
    from pluribus.data.store import load_user_data
    from pluribus.tokenizer.embed import PROFILE_SOURCE, embed_dataset
    from pluribus.tokenizer.estimator import UserTokenizer

    tok = UserTokenizer.load(tokenizer)
    if vectors:
        from pluribus.tokenizer.stream import check_embedder, read_sample, vector_folder

        files, _ = vector_folder(data, tok.source_names_)
        check_embedder(files, tok.embedder())
        return tok, read_sample(data, tok.source_names_, REPORT_SAMPLE)
    _require_stage1(tok, tokenizer)
    if embed_backend is not None:
        _require_same_embedder(tok, tokenizer, embed_backend)
    emb = embed_dataset(
        load_user_data(data), tok.embed_config, cache_dir=_cache_dir(cache_dir),
        sources=[s for s in tok.source_names_ if s != PROFILE_SOURCE], include_profile=PROFILE_SOURCE in tok.source_names_,
    )
    return tok, emb


def _require_stage1(tok: Any, tokenizer: Path) -> None:
    """A tokenizer fitted on a vector folder has no stage-1 settings: it cannot embed a data set."""
    if tok.embed_config is None:
        raise DataError("this tokenizer was fitted on stage-1 vectors (fit --vectors) and has no stage-1 settings",
                        path=tokenizer, field="embed_config", expected="a vector folder as DATA, with --vectors")


def _require_same_embedder(tok: Any, tokenizer: Path, embed_backend: str) -> None:
    """Vectors of another model or backend would be encoded into wrong codes: refuse them."""
    from pluribus.tokenizer.embed import embedder_name

    asked = embedder_name(dataclasses.replace(tok.embed_config, backend=embed_backend))
    if asked != tok.embedder():
        raise DataError(f"--embed-backend {embed_backend} gives vectors of embedder {asked!r}, but this tokenizer was "
                        f"fitted on {tok.embedder()!r}", path=tokenizer, field="embed_config.backend",
                        expected="the same model and backend (leave --embed-backend out to use the tokenizer's)")


VECTORS_HELP = "DATA is a folder of Parquet stage-1 vectors (as `fit --vectors` reads), not a data set."


@app.command()
def encode(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    tokenizer: Path = typer.Option(Path("runs/tokenizer/tokenizer"), help="Folder written by `fit` (or save())."),
    out: Path | None = typer.Option(None, help="JSONL (default runs/tokenizer/codes.jsonl): user_id, codes "
                                   "[sources][levels], suffix, tokens, tokenizer; with --vectors a codes folder "
                                   "(default runs/tokenizer/codes): Parquet, user_id + one uint16 list per source."),
    vectors: bool = typer.Option(False, "--vectors", help=VECTORS_HELP + " Streamed in batches; no suffix or tokens."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache."),
    embed_backend: str | None = typer.Option(None, "--embed-backend", help="Must give the tokenizer's own embedder "
                                             "(default: the tokenizer's backend). " + EMBED_BACKEND_HELP),
    threads: int = typer.Option(1, help=THREADS_HELP),
) -> None:
    """Encode every user of DATA into codes and token strings."""
    set_threads(threads)
    from pluribus.io import write_text
    from pluribus.progress import track
    from pluribus.tokenizer.estimator import UserTokenizer

    if vectors:
        target = out if out is not None else Path("runs/tokenizer/codes")
        if target.suffix == ".jsonl":
            raise DataError("--vectors writes a codes folder (Parquet), not JSONL", path=target, field="--out",
                            expected="a folder path")
        result = UserTokenizer.load(tokenizer).encode_parquet(data, target)
        _out.print(f"{result['users']} users -> [bold]{escape(str(target))}[/bold] ({result['parts']} part file(s))")
        return
    target = out if out is not None else Path("runs/tokenizer/codes.jsonl")
    tok, emb = _load_and_embed(tokenizer, data, cache_dir, embed_backend=embed_backend)
    codes = tok.encode(emb)
    suffix = tok.suffix(codes)
    tokens = tok.tokens(codes)
    lines = [
        json.dumps({"user_id": str(u), "codes": codes[i].tolist(), "suffix": int(suffix[i]), "tokens": tokens[i],
                    "tokenizer": tok.fingerprint_})
        for i, u in enumerate(track(list(emb.user_ids), description="writing codes"))
    ]
    write_text(target, "\n".join(lines) + "\n")
    _out.print(f"{len(lines)} users -> [bold]{escape(str(target))}[/bold] ({codes.shape[1]} sources x {codes.shape[2]} levels)")


@app.command()
def decode(
    codes: Path = typer.Argument(..., help="What `encode` wrote: a codes .jsonl (codes or tokens per line) or a "
                                 "codes folder (Parquet, from `encode --vectors`)."),
    tokenizer: Path = typer.Option(Path("runs/tokenizer/tokenizer"), help="The folder of the tokenizer that wrote CODES."),
    out: Path = typer.Option(Path("runs/tokenizer/decoded"), help="Vector folder (Parquet, as `fit --vectors` reads): "
                             "user_id + each source's reconstructed embedding (null where the user lacks it)."),
    threads: int = typer.Option(1, help=THREADS_HELP),
) -> None:
    """Reconstruct each user's per-source stage-1 embeddings from its codes (or tokens)."""
    set_threads(threads)
    from pluribus.tokenizer.estimator import UserTokenizer
    from pluribus.tokenizer.stream import write_vectors

    tok = UserTokenizer.load(tokenizer)
    user_ids, array = _read_codes(codes, tok)
    decoded = tok.decode(array)
    decoded.user_ids = np.asarray(user_ids, dtype=object)
    write_vectors(out, [decoded], embedder=tok.embedder())
    _out.print(f"{len(user_ids)} users -> [bold]{escape(str(out))}[/bold] ({len(tok.source_names_)} sources)")


def _read_codes(path: Path, tok: Any) -> tuple[list[str], np.ndarray]:
    """User ids and codes ``[users, sources, levels]`` of a codes JSONL or folder, checked against ``tok``."""
    from pluribus.tokenizer.vocab import validate_codes

    shape = (len(tok.source_names_), len(tok.level_sizes_))
    if path.is_dir():
        from pluribus.tokenizer.stream import codes_fingerprint, read_codes

        written_by = codes_fingerprint(path)
        if written_by is not None and written_by != tok.fingerprint_:
            raise DataError(f"codes written by tokenizer {written_by}", path=path, field="u2qt.tokenizer",
                            expected=f"codes of this tokenizer ({tok.fingerprint_})")
        id_array, array = read_codes(path, tok.source_names_)
        ids = [str(u) for u in id_array]
        if array.shape[1:] != shape:
            raise DataError(f"codes of shape [sources, levels] = {list(array.shape[1:])}", path=path, field="codes",
                            expected=f"{list(shape)} for this tokenizer")
        lines = list(range(1, len(ids) + 1))
    else:
        ids, rows, lines = [], [], []
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError("file not found", path=path, expected="a codes .jsonl or codes folder") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            ids.append(_user_id(path, number, line))
            rows.append(_line_codes(path, number, json.loads(line), tok, shape))
            lines.append(number)
        array = np.asarray(rows, dtype=np.int64).reshape(-1, *shape)  # checked below, then uint16
    if len(ids) == 0:
        raise DataError("no users", path=path, expected="at least one user's codes")
    try:
        validate_codes(array, tok.level_sizes_, tok.source_names_)
    except DataError as err:
        where = f"line {lines[err.row]}" if not path.is_dir() and err.row is not None else f"row {err.row}"
        raise DataError(f"{where}: {err}", path=path) from None
    return ids, array.astype(np.uint16)


def _user_id(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"not JSON ({err.msg})", path=path, line=number) from None
    if not isinstance(row, dict) or "user_id" not in row:
        raise DataError("no user_id", path=path, line=number, field="user_id", expected="one JSON object per user")
    return str(row["user_id"])


def _line_codes(path: Path, number: int, row: dict[str, Any], tok: Any, shape: tuple[int, int]) -> np.ndarray:
    """One JSONL line's codes (from ``codes``, else from ``tokens``), after checking who wrote them."""
    written_by = row.get("tokenizer")
    if written_by is not None and written_by != tok.fingerprint_:
        raise DataError(f"codes written by tokenizer {written_by}", path=path, line=number, field="tokenizer",
                        expected=f"codes of this tokenizer ({tok.fingerprint_})")
    tokens = row.get("tokens")
    from_tokens = None
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError("tokens is not a list of strings", path=path, line=number, field="tokens")
        from_tokens = tok.vocabulary_.codes_from_tokens([tokens], origin=str(path), lines=[number])[0][0]
    if "codes" not in row:
        if from_tokens is None:
            raise DataError("neither codes nor tokens", path=path, line=number, field="codes",
                            expected="codes [sources][levels] or tokens")
        return from_tokens
    try:
        codes = np.asarray(row["codes"], dtype=np.int64)
    except (TypeError, ValueError):
        codes = np.zeros(0, dtype=np.int64)
    if codes.shape != shape:
        raise DataError(f"codes of shape {list(codes.shape)}", path=path, line=number, field="codes",
                        expected=f"{list(shape)} ([sources][levels]) for this tokenizer's sources {tok.source_names_}")
    if from_tokens is not None and not np.array_equal(from_tokens, codes):
        raise DataError("the tokens and the codes of this line disagree", path=path, line=number, field="tokens",
                        expected="the tokens this tokenizer renders for the codes")
    return codes


@app.command("eval")
def evaluate(
    data: str = typer.Argument("movielens-100k", help=DATA_HELP),
    tokenizer: Path = typer.Option(Path("runs/tokenizer/tokenizer"), help="Folder written by `fit`."),
    out: Path | None = typer.Option(None, help="Write the metrics as JSON here."),
    vectors: bool = typer.Option(False, "--vectors", help=VECTORS_HELP + f" Scored on its first {REPORT_SAMPLE} users."),
    cache_dir: Path | None = typer.Option(None, help="Stage 1 embedding cache."),
    threads: int = typer.Option(1, help=THREADS_HELP),
) -> None:
    """Reconstruction, residual norms, codebook usage, collisions and bytes per user on DATA's users: held-out
    users (never trained on) and training users apart, by the training users the tokenizer recorded."""
    set_threads(threads)
    from pluribus.io import write_json
    from pluribus.tokenizer.metrics import split_reports

    tok, emb = _load_and_embed(tokenizer, data, cache_dir, vectors=vectors)
    reports = split_reports(tok, emb)
    if out is not None:
        write_json(out, reports)
    if reports["split"] == "unknown":
        _log.print(f"which users trained this tokenizer is not recorded (fitted on arrays without user ids, or saved "
                   f"by an older pluribus): the metrics are over all {emb.n_users} users, training users included")
        _print_report(reports["all"], f"all {emb.n_users} users (training users included)")
        return
    n = reports["users"]
    for section in ("heldout", "training"):
        title = f"{_REPORT_TITLES[section]}: {n[section]} users"
        if reports[section] is None:
            _out.print(f"{title}: too few to score")
        else:
            _print_report(reports[section], title)


_REPORT_TITLES = {"heldout": "held-out users (never trained on)", "training": "training users",
                  "trained_users": "training users (no held-out split: fit --vectors or holdout 0)"}


def _print_report(report: dict[str, Any], title: str) -> None:
    _out.rule(title)
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
    whose = "held-out users" if cfg.holdout > 0 else "training users: no held-out split"
    return "\n\n".join([
        f"# U2QT tokenizer on {name}",
        f"Backend `{t.backend}`{' (balanced k-means)' if t.backend == 'rq-kmeans' and t.kmeans_balanced else ''}, "
        f"layout `{t.layout}`, {t.n_shared} shared + {t.n_specific} specific levels, codebooks {t.shared_size} shared / "
        f"{t.specific_size} specific x "
        f"{t.latent_dim if t.backend == 'rqvae' else 'input'} dims; fitted on {n_train} users. Reconstruction and residuals "
        f"on {n_test} {whose}; codebook usage and collisions on all {n_users} users.",
        f"## Reconstruction ({whose})", markdown_table(recon),
        "## Residual norm per level", ", ".join(f"{v:.3f}" for v in report["residual_norms"]),
        "## Codebook usage (all users)", markdown_table(usage),
        f"## Size and collisions\n\nCollision rate {c['collision_rate']:.2%}, largest bucket {c['largest_bucket']}. "
        f"Bytes per user: {b['codes']:.0f} (codes) vs {b['float32']:.0f} float32 ({b['ratio_float32']:.0f}x) and "
        f"{b['float16']:.0f} float16 ({b['ratio_float16']:.0f}x).",
    ]) + "\n"


def _plot_loss(path: Path, history: list[dict[str, float]], *, xlabel: str = "epoch") -> None:
    from pluribus.eval.report import line_plot

    xs = list(range(1, len(history) + 1))
    line_plot(
        path, {k: (xs, [h[k] for h in history]) for k in ("recon", "vq")},
        xlabel=xlabel, ylabel="loss", title="tokenizer training",
    )


# ---- stage 1 on Parquet shards (pluribus.tokenizer.shards) ------------------------------------------------
SHARDS_DOC = "docs/results/tokenizer.md, 'Stage 1 on Parquet shards'"


def _embed_config(config: Path | None, overrides: dict[str, Any]) -> Any:
    """The [embed] table of a TOML (as `fit` reads it) or the defaults, with the options given on the line."""
    from pluribus.config import load_config
    from pluribus.tokenizer.config import EmbedConfig, TokenizeRunConfig

    cfg = load_config(TokenizeRunConfig, config).embed if config is not None else EmbedConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


@app.command("embed")
def embed_shards_command(
    folder: Path = typer.Argument(..., help="Folder of Parquet shards, one row per slice: user_id, text, and optionally "
                                  f"source and slice (see {SHARDS_DOC})."),
    out: Path = typer.Argument(..., help="Vector folder to write, one file per shard (what `fit --vectors` reads); "
                               "rerunning resumes at the first unfinished shard."),
    workers: int = typer.Option(1, min=1, max=4096, help="Workers, each with its own copy of the embedder."),
    engine: str | None = typer.Option(None, help="local (this process; default with 1 worker), pool (worker "
                                      "processes; default with more) or ray (Ray Data map_batches, an actor pool)."),
    address: str | None = typer.Option(None, help="With --engine ray: an existing Ray cluster (auto, or the head's "
                                       "address); default: a local Ray of workers x threads CPUs."),
    gpus_per_worker: float = typer.Option(0.0, min=0.0, help="With --engine ray: GPUs each actor reserves (1 with "
                                          "--device cuda: one actor per GPU)."),
    threads: int = typer.Option(1, min=1, max=1024, help="torch CPU threads per worker."),
    config: Path | None = typer.Option(None, help="TOML with an [embed] table, as `fit` reads it (model, kind, "
                                       "batch_size, combine, ...)."),
    model: str | None = typer.Option(None, help="Override embed.model (a local path or id; default: packaged MiniLM)."),
    device: str | None = typer.Option(None, help="Override embed.device (cpu, cuda)."),
    batch_size: int | None = typer.Option(None, min=1, max=65536, help="Override embed.batch_size."),
    embed_backend: str | None = typer.Option(None, "--embed-backend", help="Override embed.backend. " + EMBED_BACKEND_HELP),
    combine: str | None = typer.Option(None, help="Override embed.combine: mean or recency (of a user's slices)."),
    text_column: str = typer.Option("text", help="Column with each slice's text."),
    user_column: str = typer.Option("user_id", help="Column with the user id."),
    source_column: str = typer.Option("source", help="Column with the slice's source (may be absent: see --source)."),
    slice_column: str = typer.Option("slice", help="Column with the slice's position, 0 = oldest (may be absent: "
                                     "row order)."),
    source: str = typer.Option("text", help="The source of every slice when the shards have no source column."),
    force: bool = typer.Option(False, "--force", help="Start OUT over (its manifest and Parquet files are removed)."),
) -> None:
    """Stage 1 over a folder of Parquet shards of slice texts, on several workers or a Ray cluster; resumable."""
    from pluribus.tokenizer.shards import ShardColumns, embed_shards

    cfg = _embed_config(config, {"model": model, "device": device, "batch_size": batch_size, "combine": combine,
                                 "backend": embed_backend})
    columns = ShardColumns(user=user_column, text=text_column, source=source_column, slice=slice_column,
                           default_source=source)
    report = embed_shards(folder, out, cfg, workers=workers, engine=engine, threads=threads, columns=columns,
                          address=address, gpus_per_worker=gpus_per_worker, force=force, note=_log.print)
    rate = report["slices_per_s"]
    _out.print(f"{report['shards_embedded']} shard(s) embedded now ({report['slices']} slices, {report['users']} users"
               + (f", {rate:.1f} slices/s with {report['workers']} {report['engine']} worker(s)" if rate else "")
               + f"); [bold]{escape(str(out))}[/bold] holds all {report['shards']}: "
               f"pluribus tokenize fit {escape(str(out))} --vectors", soft_wrap=True)


@app.command("slices")
def slices_command(
    data: str = typer.Argument(..., help=DATA_HELP),
    out: Path = typer.Argument(..., help="Folder of Parquet shards to write (user_id, source, slice, text), the input "
                               "of `tokenize embed`."),
    shards: int = typer.Option(8, min=1, max=1_000_000, help="Number of shards (each user's slices in one)."),
    config: Path | None = typer.Option(None, help="TOML with an [embed] table (slice_tokens, slice_days, event_template, "
                                       "...); default: the demo's 254-token slices with numbers in the text."),
    sources: str | None = typer.Option(None, help="Comma-separated text sources (default: every text source)."),
) -> None:
    """Cut every user's history into slice texts (as stage 1 does) and write them as Parquet shards."""
    from pluribus.data.store import load_user_data
    from pluribus.tokenizer.config import EmbedConfig
    from pluribus.tokenizer.shards import write_slice_shards

    cfg = _embed_config(config, {}) if config is not None else EmbedConfig(slice_tokens=254, numeric_in_text=True)
    ds = load_user_data(data)
    ds.require(needed_by="tokenize slices", sources=True, origin=data)
    names = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
    result = write_slice_shards(ds, out, cfg, sources=names, shards=shards)
    missing = result["users_without_slices"]
    _out.print(f"{result['slices']} slices of {result['users']} users"
               + (f" ({missing} user(s) without events have none and are left out)" if missing else "")
               + f" -> [bold]{escape(str(out))}[/bold] "
               f"({result['shards']} shards); embed them with: pluribus tokenize embed {escape(str(out))} VECTORS", soft_wrap=True)
