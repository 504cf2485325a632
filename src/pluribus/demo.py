"""`pluribus demo`: the chain of systems on real data, one resumable step at a time.

Each step writes its metrics (metrics.json, under the step's name), a markdown section
(``sections/<step>.md``) and any plots into the run folder, then marks itself done. A rerun with the
same options skips finished steps; a failing step stops the run with a message naming it, leaving
the earlier steps' outputs as they were. The report is rebuilt from the sections after every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markdown import Markdown

from pluribus.data.schema import UserDataset
from pluribus.data.store import load_user_data
from pluribus.errors import ConfigError, PluribusError
from pluribus.eval.probes import probe_tasks
from pluribus.eval.report import bar_plot, markdown_table, mean_std
from pluribus.io import write_text
from pluribus.runs import RunFolder

_console = Console(stderr=True)


@dataclass(frozen=True)
class DemoConfig:
    """Options of one demo run (stored as the run folder's config.toml)."""

    data: str = "movielens-100k"
    steps: tuple[str, ...] = ()
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class StepResult:
    """What a step hands back: metrics for metrics.json and a markdown section for report.md."""

    metrics: dict[str, Any]
    section: str


@dataclass
class DemoContext:
    """Shared state between steps: the config, the run folder and the loaded data."""

    config: DemoConfig
    run: RunFolder
    data: UserDataset


def _step_data(ctx: DemoContext) -> StepResult:
    summary = ctx.data.summary()
    rows = [
        {"source": name, "events": s["events"], "median events/user": s["events_per_user_median"],
         "fields": ", ".join(s["fields"])}
        for name, s in summary["sources"].items()
    ]
    labels = [
        {"task": name, "kind": lab["kind"], "labelled": lab["labelled"],
         "balance": ", ".join(f"{k}: {v:.1%}" for k, v in lab.get("balance", {}).items())}
        for name, lab in summary["labels"].items()
    ]
    section = (
        f"## Data\n\n**{summary['name']}**: {summary['users']} users, {len(rows)} sources, "
        f"{len(summary['profile_columns'])} profile columns, {len(labels)} label tasks.\n\n"
        + markdown_table(rows) + "\n" + markdown_table(labels)
    )
    return StepResult({"users": summary["users"], "sources": summary["sources"], "labels": summary["labels"]}, section)


def _simple_features(ds: UserDataset) -> np.ndarray:
    """The simple baseline's features: the tabular profile, or per-source event counts without one."""
    if ds.profile is not None and ds.profile.shape[1] > 0:
        return ds.profile.fillna(0.0).to_numpy(dtype=np.float64)
    counts = [ds.source(s).groupby("user_id").size().reindex(ds.user_ids, fill_value=0) for s in ds.source_names]
    return np.log1p(np.stack([c.to_numpy(dtype=np.float64) for c in counts], axis=1))


def _step_baseline(ctx: DemoContext) -> StepResult:
    ds = ctx.data
    x = _simple_features(ds)
    seeds = ctx.config.seeds[:1] if ctx.config.quick else ctx.config.seeds
    results = probe_tasks(x, ds, seeds=seeds, folds=5)
    rows = [
        {"task": t, "AUC": mean_std([f["auc"] for f in r.folds]), "KS": mean_std([f["ks"] for f in r.folds]),
         "accuracy": mean_std([f["acc"] for f in r.folds]), "users": r.n}
        for t, r in results.items()
    ]
    plot = bar_plot(
        ctx.run.plot_path("baseline_probe_auc"), {t: (r.auc_mean, r.auc_std) for t, r in results.items()},
        ylabel="probe AUC (5-fold)", title="Linear probe on simple features",
    )
    section = (
        "## Baseline: linear probe on simple features\n\n"
        f"Logistic regression on {x.shape[1]} simple per-user features (the history's rating statistics and "
        f"genre shares), {len(seeds)} seed(s) x 5 folds; mean ± std over folds.\n\n"
        + markdown_table(rows) + f"\n![baseline probe AUC]({plot.name})\n"
    )
    return StepResult({t: r.as_dict() for t, r in results.items()}, section)


STEPS: dict[str, Callable[[DemoContext], StepResult]] = {
    "data": _step_data,
    "baseline": _step_baseline,
}


def _parse_steps(steps: str) -> tuple[str, ...]:
    if steps.strip() in ("", "all"):
        return tuple(STEPS)
    chosen = tuple(s.strip() for s in steps.split(",") if s.strip())
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown demo step(s) {unknown}; steps are {list(STEPS)}")
    return tuple(s for s in STEPS if s in chosen)


def _write_report(run: RunFolder, config: DemoConfig) -> Path:
    timings = run.metrics().get("timings", {})
    parts = [
        "# pluribus demo\n",
        f"Data: `{config.data}`; steps: {', '.join(config.steps)}; quick: {config.quick}.\n",
    ]
    for step in config.steps:
        section = run.path / "sections" / f"{step}.md"
        if section.exists():
            parts.append(section.read_text(encoding="utf-8"))
    if timings:
        parts.append("## Time per step\n\n" + markdown_table(
            [{"step": s, "seconds": round(float(t), 1)} for s, t in timings.items()]))
    return run.write_report("\n".join(parts))


def run_demo(*, out: Path, data: str = "movielens-100k", steps: str = "all", quick: bool = False) -> Path:
    """Run (or resume) the demo chain into run folder ``out``; returns the report path."""
    config = DemoConfig(data=data, steps=_parse_steps(steps), quick=quick)
    dataset = load_user_data(data)  # bad data fails here, before anything is written
    run = RunFolder(out, config)
    ctx = DemoContext(config, run, dataset)
    for step in config.steps:
        if run.is_done(step):
            _console.print(f"[dim]step {step}: done in an earlier run, skipped[/dim]")
            continue
        _console.rule(f"[bold]{step}")
        start = time.perf_counter()
        try:
            result = STEPS[step](ctx)
        except PluribusError as err:
            raise PluribusError(f"demo step '{step}' failed: {err}") from err
        except Exception as err:  # an unexpected failure still names the step and keeps earlier outputs
            raise PluribusError(f"demo step '{step}' failed unexpectedly: {type(err).__name__}: {err}") from err
        elapsed = time.perf_counter() - start
        run.log_metrics(step, result.metrics)
        run.log_metrics("timings", {step: elapsed})
        write_text(run.path / "sections" / f"{step}.md", result.section)
        run.mark_done(step, {"seconds": elapsed})
        _console.print(Markdown(result.section))
    report = _write_report(run, config)
    _console.print(f"[bold green]report:[/bold green] {report}")
    return report
