"""Demo step 3, FedBone: institutions with different user-label tasks train one server-side backbone by
split learning over their users' U2QT token vectors, with conflicting-gradient projection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.multitask import delta_m
from pluribus.eval.report import (
    NOT_DEFINED,
    bar_plot,
    compare_word,
    markdown_table,
    mean_std,
    metric_text,
    warnings_markdown,
)

if TYPE_CHECKING:
    from pluribus.federated.studies.results import RunResult

INSTITUTIONS = 4
# FedBone's regime: every client can afford only a small full model (the baselines train those); the server
# hosts a large backbone that no client could (FedBone trains that by split learning).
METHODS = {  # label -> algorithm, aggregation method, model size
    "local only": ("local", None, "small"),
    "FedAvg (shared body, local heads)": ("fedper", None, "small"),
    "FedBone without projection": ("fedbone", "mean", "large"),
    "FedBone (GPAggregation)": ("fedbone", "gp", "large"),
}


def _tasks_for(ctx: DemoContext) -> list[str]:
    # One institution per task, distinct tasks first (demographics, then future behaviour).
    names = ctx.probe_tasks()
    binary = [t for t in names if ctx.data.tasks[t].kind == "binary"]
    chosen = (binary + [t for t in names if t not in binary])[:INSTITUTIONS]
    return chosen


def step_federate(ctx: DemoContext) -> StepResult:
    """Run FedBone and its baselines on the same institutions, data and budget; per-task AUC and delta-m."""
    from dataclasses import replace

    from pluribus.federated import run_fedbone, run_fedbone_flower, save_feature_suite
    from pluribus.federated.core.config import regime_models
    from pluribus.federated.core.split import regime_parameter_counts
    from pluribus.federated.studies.tasks import feature_suite_config, feature_suite_tasks

    tensors, meta = ctx.artifact("tokenize", needed_by="federate")
    tokens = tensors["code_vectors"].float()  # [users, sources, latent]: each source is one input token
    tasks = _tasks_for(ctx)
    steps = 60 if ctx.config.quick else 300
    per_method: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    extras: dict[str, Any] = {}
    sizes = dict(zip(("small", "large"), regime_models(), strict=True))
    counts: dict[str, int] = {}
    for seed in ctx.seeds:
        # Each institution's share of users and labels, as a file any Flower client process can read.
        suite_path = save_feature_suite(ctx.run.path / "federate" / f"suite-seed{seed}.safetensors", tokens,
                                        ctx.data, tasks, seed=seed)
        clients = feature_suite_tasks(suite_path, tasks, seed=seed)
        counts = regime_parameter_counts(clients, sizes["small"], sizes["large"])
        for label, (algorithm, aggregation, size) in METHODS.items():
            config = replace(feature_suite_config(suite_path, tasks, seed=seed, steps=steps, algorithm=algorithm,
                                                  aggregation=aggregation or "gp"), model=sizes[size])
            result: RunResult
            if algorithm == "fedbone":  # FedBone runs over Flower: in-process grid, Ray simulation or deployment
                result = run_fedbone_flower(config, engine=ctx.config.engine)  # type: ignore[arg-type]
            else:  # the baselines are not split learning: they run in process on the same data and budget
                result = run_fedbone(config, progress=False)
            per_method[label].append(result.primary(clients))
            if label == "FedBone (GPAggregation)":
                extras = {"bytes": result.bytes, "conflict_fraction": result.mean_conflict_fraction}
    task_keys = list(per_method["local only"][0])
    mean_of = {m: {k: float(np.mean([r[k] for r in runs])) for k in task_keys} for m, runs in per_method.items()}
    # Δm over the tasks whose AUC is defined for every method and non-zero for the reference (a tiny test
    # split, as in --quick, can hold one class only)
    defined = [k for k in task_keys
               if all(np.isfinite(mean_of[m][k]) for m in METHODS) and mean_of["local only"][k] > 0]
    lower = {k: False for k in defined}
    warnings = []
    for key in task_keys:
        undefined = sum(not np.isfinite(r[key]) for runs in per_method.values() for r in runs)
        if undefined:
            warnings.append(f"task '{key.split(':', 1)[1]}': AUC not defined in {undefined} of "
                            f"{sum(len(runs) for runs in per_method.values())} runs (the institution's test split "
                            "holds one class); the table averages the defined runs and Δm leaves the task out")
    # Δm per seed (each run against local-only's run of the same seed), so the table and the summary show
    # the same figure with its spread
    delta_ms = {label: _delta_m_per_seed(per_method, label, defined, lower) for label in per_method}
    rows = []
    for label, runs in per_method.items():
        row: dict[str, Any] = {"method": label}
        for key in task_keys:
            row[key.split(":", 1)[1]] = mean_std([r[key] for r in runs])
        row["Δm vs local (%)"] = mean_std(delta_ms[label], 1)  # not defined when no task is
        rows.append(row)
    plot = bar_plot(
        ctx.run.plot_path("federate_auc"),
        {k.split(":", 1)[1]: {m: (mean_of[m][k], float(np.std([r[k] for r in per_method[m]]))) for m in METHODS}
         for k in task_keys},
        ylabel="test AUC (each institution's own users)", title="FedBone vs baselines", chance=0.5,
    )
    bytes_per_step = extras.get("bytes", {}).get("per_step_train", float("nan"))
    section = (
        "## Step 3, FedBone: one backbone for institutions with different tasks\n\n"
        f"FedBone runs over Flower (engine: `{ctx.config.engine}`). "
        f"{len(tasks)} institutions, disjoint users, one task each ({', '.join(tasks)}). Each client embeds its "
        f"users' U2QT token vectors ({tokens.shape[1]} tokens of {tokens.shape[2]} dims), the server runs a "
        f"shared transformer backbone, and each client keeps its adapter and head; labels never leave a client. "
        f"In FedBone's regime: the server's backbone has {counts['server_backbone']:,} parameters, "
        f"{counts['server_backbone'] / counts['fedbone_client_max']:.1f}x the largest FedBone client part "
        f"({counts['fedbone_client_max']:,}); the baselines train the small full model a client can afford alone "
        f"(up to {counts['small_full_max']:,} parameters). "
        f"{steps} steps per run, {len(ctx.seeds)} seed(s), mean ± std of each institution's test AUC; Δm is the "
        "mean relative gain in AUC over local-only training of the same seed, mean ± std over seeds.\n\n" + warnings_markdown(warnings) + markdown_table(rows)
        + f"\n![FedBone vs baselines]({plot.name})\n\n"
        f"FedBone moved {metric_text(bytes_per_step / 1024, 1)} KiB per training step (all four message types, all "
        f"clients); mean fraction of conflicting client pairs per step: "
        f"{metric_text(extras.get('conflict_fraction', float('nan')), 2)}.\n"
    )
    metrics = {"tasks": tasks, "steps": steps, "per_method": per_method, "delta_m_per_seed": delta_ms,
               "parameters": counts, **extras}
    return StepResult(metrics, section, warnings, summary=_summary(delta_ms, len(defined)))


def _delta_m_per_seed(per_method: dict[str, list[dict[str, float]]], label: str, defined: list[str],
                      lower: dict[str, bool]) -> list[float]:
    """``label``'s Δm (%) against local-only, one value per seed, over the ``defined`` tasks."""
    if not defined:
        return []
    return [delta_m({k: run[k] for k in defined}, {k: ref[k] for k in defined}, lower)
            for run, ref in zip(per_method[label], per_method["local only"], strict=True)]


def _summary(delta_ms: dict[str, list[float]], n_tasks: int) -> list[dict[str, str]]:
    """The closing summary's row: FedBone's Δm vs local-only per seed, against FedAvg's."""
    if not n_tasks:
        return [{"measure": "Δm of test AUC vs local-only", "ours": NOT_DEFINED, "baseline beside it": NOT_DEFINED,
                 "verdict": NOT_DEFINED}]
    ours, fedavg = delta_ms["FedBone (GPAggregation)"], delta_ms["FedAvg (shared body, local heads)"]
    zero = [0.0] * len(ours)  # local-only's own Δm, per seed
    return [{"measure": f"Δm of test AUC vs local-only ({n_tasks} institutions), %",
             "ours": f"FedBone (GP) {mean_std(ours, 1)}",
             "baseline beside it": f"local only 0 by definition; FedAvg {mean_std(fedavg, 1)}",
             "verdict": f"{compare_word(ours, zero)} local only; {compare_word(ours, fedavg)} FedAvg"}]
