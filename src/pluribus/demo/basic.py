"""The first demo steps (data summary, simple-feature baseline) and the probe comparison every step uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pluribus.data.features import simple_features
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.probes import ProbeResult, probe_tasks
from pluribus.eval.report import (
    NOT_DEFINED,
    bar_plot,
    gap_word,
    is_defined,
    markdown_table,
    mean_std,
    warnings_markdown,
)

SIMPLE = "simple features"
#: Every demo probe's inverse L2 strength (the benchmarks' setting): high-dimensional embeddings need the
#: regularisation, and lbfgs converges in a fraction of the iterations C = 1 takes on 1,152 dimensions.
PROBE_C = 0.1


def step_data(ctx: DemoContext) -> StepResult:
    """Summarise users, sources and labels."""
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


def _summaries(results: Mapping[str, ProbeResult]) -> dict[str, dict[str, float]]:
    return {task: r.as_dict() for task, r in results.items()}


def simple_probe(ctx: DemoContext) -> dict[str, dict[str, float]]:
    """The simple-feature probe results: from the baseline step when it ran, else computed now."""
    earlier = ctx.earlier_metrics("baseline")
    if earlier and all(t in earlier for t in ctx.probe_tasks()):
        return {t: earlier[t] for t in ctx.probe_tasks()}
    return _summaries(probe_tasks(simple_features(ctx.data), ctx.data, ctx.probe_tasks(), seeds=ctx.seeds,
                                   c=PROBE_C))


def defined_aucs(results: Mapping[str, Mapping[str, float]], tasks: Iterable[str]) -> list[float]:
    """The mean AUCs of ``tasks`` in ``results`` (task -> ``ProbeResult.as_dict()``) that are defined (not NaN)."""
    return [results[t]["auc_mean"] for t in tasks if is_defined(results[t]["auc_mean"])]


def mean_auc(results: Mapping[str, Mapping[str, float]], tasks: Iterable[str] | None = None) -> float:
    """Mean AUC over the defined ``tasks`` (default: every task in ``results``); NaN when none is defined."""
    defined = defined_aucs(results, results if tasks is None else tasks)
    return float(np.mean(defined)) if defined else float("nan")


def _auc_text(result: Mapping[str, float]) -> str:
    if not is_defined(result["auc_mean"]):
        return NOT_DEFINED
    return f"{result['auc_mean']:.3f} ± {result['auc_std']:.3f}"


def probe_warnings(results: Mapping[str, ProbeResult]) -> list[str]:
    """The probes' small-data warnings, each once."""
    return list(dict.fromkeys(w for r in results.values() for w in r.warnings))


def compare_probes(
    ctx: DemoContext, features: Mapping[str, np.ndarray], *, plot_name: str, title: str
) -> tuple[dict[str, Any], str]:
    """Probe each feature set on every task beside the simple baseline: metrics, a markdown table and a plot."""
    methods: dict[str, dict[str, dict[str, float]]] = {SIMPLE: simple_probe(ctx)}
    warnings: list[str] = []
    for name, x in features.items():
        results = probe_tasks(x, ctx.data, ctx.probe_tasks(), seeds=ctx.seeds, c=PROBE_C)
        warnings += [w for w in probe_warnings(results) if w not in warnings]
        methods[name] = _summaries(results)
    rows = []
    for task in ctx.probe_tasks():
        row: dict[str, Any] = {"task": task}
        for name, res in methods.items():
            row[f"{name} AUC"] = _auc_text(res[task])
        rows.append(row)
    mean_row: dict[str, Any] = {"task": "**mean**"}
    for name, res in methods.items():
        defined = defined_aucs(res, ctx.probe_tasks())
        mean_row[f"{name} AUC"] = f"**{np.mean(defined):.3f}**" if defined else NOT_DEFINED
        if len(defined) < len(ctx.probe_tasks()):
            mean_row[f"{name} AUC"] += f" ({len(defined)} of {len(ctx.probe_tasks())} tasks defined)"
    rows.append(mean_row)
    plot = bar_plot(
        ctx.run.plot_path(plot_name),
        {t: {m: (res[t]["auc_mean"], res[t]["auc_std"]) for m, res in methods.items()} for t in ctx.probe_tasks()},
        ylabel="linear-probe AUC", title=title, chance=0.5,
    )
    text = (
        f"Logistic-regression probes (C = {PROBE_C:g}), {len(ctx.seeds)} seed(s) x 5 folds over all users; mean ± std "
        "over folds.\n\n"
        + warnings_markdown(warnings) + markdown_table(rows) + f"\n![{title}]({Path(plot).name})\n"
    )
    return methods, text


def probe_summary_row(methods: Mapping[str, Mapping[str, Mapping[str, float]]], ours: str, reference: str, *,
                      ours_note: str = "", baseline_note: str = "") -> dict[str, str]:
    """A summary row (runner.SUMMARY_COLUMNS): mean probe AUC of ``ours`` against ``reference`` over the tasks both
    define, from ``compare_probes``' methods. The gap is 'level with' within the mean per-task spread (std over
    seeds and folds) of the two."""
    tasks = [t for t in methods[ours] if is_defined(methods[ours][t]["auc_mean"])
             and is_defined(methods[reference][t]["auc_mean"])]
    if not tasks:
        return {"measure": "mean probe AUC", "ours": f"{ours} {NOT_DEFINED}", "baseline beside it": reference,
                "verdict": NOT_DEFINED}

    def mean_and_spread(name: str) -> tuple[float, float]:
        return (float(np.mean([methods[name][t]["auc_mean"] for t in tasks])),
                float(np.mean([methods[name][t]["auc_std"] for t in tasks])))

    (mine, mine_sd), (ref, ref_sd) = mean_and_spread(ours), mean_and_spread(reference)
    gap, spread = mine - ref, max(mine_sd, ref_sd)
    word = gap_word(gap, spread)
    return {"measure": f"mean probe AUC ({len(tasks)} tasks)",
            "ours": f"{ours} {mine:.3f}" + (f" {ours_note}" if ours_note else ""),
            "baseline beside it": f"{reference} {ref:.3f}" + (f" {baseline_note}" if baseline_note else ""),
            "verdict": f"{word} {reference} (gap {gap:+.3f}, per-task spread ±{spread:.3f})"}


def step_baseline(ctx: DemoContext) -> StepResult:
    """Linear probe on simple per-user features: the reference every later step is compared with."""
    ds = ctx.data
    x = simple_features(ds)
    results = probe_tasks(x, ds, ctx.probe_tasks(), seeds=ctx.seeds, folds=5, c=PROBE_C)
    rows = [
        {"task": t, "AUC": mean_std([f["auc"] for f in r.folds]), "KS": mean_std([f["ks"] for f in r.folds]),
         "accuracy": mean_std([f["acc"] for f in r.folds]), "users": r.n}
        if r.defined else {"task": t, "AUC": NOT_DEFINED, "KS": NOT_DEFINED, "accuracy": NOT_DEFINED, "users": r.n}
        for t, r in results.items()
    ]
    plot = bar_plot(
        ctx.run.plot_path("baseline_probe_auc"), {t: (r.auc_mean, r.auc_std) for t, r in results.items()},
        ylabel="probe AUC (5-fold)", title="Linear probe on simple features", chance=0.5,
    )
    section = (
        "## Baseline: linear probe on simple features\n\n"
        f"Logistic regression (C = {PROBE_C:g}) on {x.shape[1]} simple per-user features (the profile: for MovieLens the "
        f"history's rating statistics and genre shares), {len(ctx.seeds)} seed(s) x 5 folds; mean ± std over "
        "folds.\n\n" + warnings_markdown(probe_warnings(results)) + markdown_table(rows)
        + f"\n![baseline probe AUC]({plot.name})\n"
    )
    return StepResult(_summaries(results), section, probe_warnings(results))
