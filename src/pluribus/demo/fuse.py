"""Demo step 4, PrivFusion: institutions train task models on their own users' GGSM embeddings; the
models are fused under local differential privacy by neuron matching, then repaired by the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pluribus.data.features import simple_features
from pluribus.data.split import split_indices
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.report import (
    bar_plot,
    compare_word,
    defined_mean_std,
    line_plot,
    markdown_table,
    mean_std,
    split_warnings,
    warnings_markdown,
)

PARTIES = 4
EPSILON = 4.0  # the ε whose privacy report is shown
EPSILONS = (1.0, 4.0, 16.0)  # the curve; --quick runs only EPSILON


@torch.no_grad()
def _scores(model: torch.nn.Module | list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    models = model if isinstance(model, list) else [model]
    probs = sum(torch.softmax(m.eval()(x), dim=1) for m in models) / len(models)
    assert isinstance(probs, torch.Tensor)
    acc = float((probs.argmax(1) == y).float().mean())
    yn, pn = y.numpy(), probs.numpy()
    present = [c for c in range(pn.shape[1]) if 0 < (yn == c).sum() < len(yn)]
    if not present:  # a one-class test split: AUC does not exist (NaN, shown as "not defined")
        auc = float("nan")
    elif pn.shape[1] == 2:
        auc = float(roc_auc_score(yn, pn[:, 1]))
    else:
        auc = float(np.mean([roc_auc_score(yn == c, pn[:, c]) for c in present]))
    return {"accuracy": acc, "auc": auc}


def _one_seed(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int, ctx: DemoContext, task: str, epsilons: tuple[float, ...]
) -> tuple[dict[str, dict[str, float]], Any, dict[str, float], list[str]]:
    import copy

    from pluribus.fusion import MLP, AdapterConfig, FusionConfig, privfusion
    from pluribus.fusion.core.fuse import fuser_ledger, repair_fused
    from pluribus.fusion.core.models import train_model
    from pluribus.fusion.flower.apps import PartyFiles, run_fusion_flower
    from pluribus.fusion.flower.party_files import save_party_data, save_party_model
    from pluribus.fusion.privacy.accounting import PrivacyLedger

    quick = ctx.config.quick
    train, calib, test = split_indices(len(y), (0.7, 0.1, 0.2), seed=seed)
    parts = np.array_split(np.random.default_rng(seed).permutation(train), PARTIES)
    epochs = 30 if quick else 60
    parties = []
    for k, part in enumerate(parts):
        torch.manual_seed(1000 * seed + k)  # different initialisations: the regime where matching matters
        model = MLP(x.shape[1], (64, 64), n_classes)
        parties.append(train_model(model, x[part], y[part], epochs=epochs, seed=1000 * seed + k))
    x_test, y_test, cal = x[test], y[test], (x[calib], y[calib])
    torch.manual_seed(seed)
    calib_only = train_model(MLP(x.shape[1], (64, 64), n_classes), *cal, epochs=epochs, seed=seed)
    # without DP the raw weights would reach the hub, so those two references are fused in this process
    averaged = privfusion(parties, config=FusionConfig(epsilon=float("inf"), solver="identity", seed=seed))
    matched = privfusion(parties, config=FusionConfig(epsilon=float("inf"), seed=seed))
    party_scores = [_scores(p, x_test, y_test) for p in parties]
    results = {
        "each institution alone (mean)": {k: float(np.mean([s[k] for s in party_scores])) for k in ("accuracy", "auc")},
        "calibration set alone": _scores(calib_only, x_test, y_test),
        "plain weight averaging (no DP)": _scores(averaged.model, x_test, y_test),
        "matched averaging (no DP)": _scores(matched.model, x_test, y_test),
    }
    # each institution a Flower ClientApp holding its own model and data files; the hub a relaying ServerApp
    work = ctx.run.path / "fuse_parties" / f"seed{seed}"
    files = []
    for k, (party_model, part) in enumerate(zip(parties, parts, strict=True)):
        name = f"institution{k}"
        # the same model is released once per ε point: its budget covers exactly the curve (1 + 4 + 16 = 21)
        files.append(PartyFiles(name, save_party_model(work / f"{name}.model.safetensors", party_model, party=name),
                                save_party_data(work / f"{name}.data.safetensors", x[part], y[part]),
                                budget=float(sum(epsilons))))
    ledgers: list[PrivacyLedger] = []
    for eps in epsilons:
        fused = run_fusion_flower(files, FusionConfig(epsilon=eps, seed=seed), engine=ctx.config.engine,  # type: ignore[arg-type]
                                  out_dir=work / f"eps{eps:g}")
        if fused.excluded or fused.model is None:
            raise RuntimeError(f"PrivFusion over Flower left parties out at ε={eps:g}: {fused.excluded}")
        fuser = fuser_ledger()
        repaired, _ = repair_fused(copy.deepcopy(fused.model), cal, AdapterConfig(seed=seed), fuser)
        results[f"PrivFusion ε={eps:g}, no adapter"] = _scores(fused.model, x_test, y_test)
        results[f"PrivFusion ε={eps:g} + adapter"] = _scores(repaired, x_test, y_test)
        if eps == EPSILON:
            ledgers = [*fused.ledgers, fuser]
        spent = {led.party: float(led.spent["per_scalar_epsilon"]) for led in fused.ledgers if led.spent}
    results["logit ensemble (not private, upper bound)"] = _scores(parties, x_test, y_test)
    # spent: each institution's odometer after the last release, every ε point composed
    return results, ledgers, spent, split_warnings(f"test (seed {seed})", {task: y_test.numpy()},
                                                   classes={task: n_classes})


def step_fuse(ctx: DemoContext) -> StepResult:
    """Fuse four institutions' task models with PrivFusion at a stated epsilon; report the privacy ledger."""
    from pluribus.fusion import privacy_report, privacy_report_markdown

    tensors, _ = ctx.artifact("encode", needed_by="fuse")
    task = ctx.probe_tasks()[0]
    mask, labels = ctx.data.label_array(task)
    # Each institution's model reads the GGSM embedding beside the standardised simple features.
    simple = simple_features(ctx.data)
    simple = (simple - simple.mean(0)) / (simple.std(0) + 1e-8)
    features = np.concatenate([tensors["user_embeddings"].numpy(), simple], axis=1)
    x = torch.from_numpy(features[mask]).float()
    y = torch.from_numpy(labels).long()
    n_classes = int(y.max()) + 1
    per_seed, ledgers, warnings = [], None, []
    epsilons = (EPSILON,) if ctx.config.quick else EPSILONS
    spent: dict[str, float] = {}
    for seed in ctx.seeds:
        results, ledgers, spent, seed_warnings = _one_seed(x, y, n_classes, seed, ctx, task, epsilons)
        per_seed.append(results)
        warnings += seed_warnings
    methods = list(per_seed[0])
    summary = {m: {k: [r[m][k] for r in per_seed] for k in ("accuracy", "auc")} for m in methods}
    rows = [{"model": m, "test AUC": mean_std(v["auc"]), "test accuracy": mean_std(v["accuracy"])}
            for m, v in summary.items()]
    plot = bar_plot(
        ctx.run.plot_path("fuse_auc"),
        {m: defined_mean_std(v["auc"]) for m, v in summary.items()
         if "ε=" not in m or m.startswith(f"PrivFusion ε={EPSILON:g}")},
        ylabel=f"test AUC ({task})", title=f"PrivFusion of {PARTIES} institutions' models (ε = {EPSILON:g})",
        chance=0.5,
    )
    figures = f"![fusion AUC]({plot.name})\n"
    if len(epsilons) > 1:
        figures += f"\n![AUC vs epsilon]({_epsilon_curve(ctx, summary, epsilons, task).name})\n"
    verdict = _verdict(summary, epsilons)
    assert ledgers is not None
    composed = max(spent.values(), default=float("nan"))
    cost = (f"Each institution releases **the same model** once per ε point, so the whole step costs each of them "
            f"ε = {' + '.join(f'{e:g}' for e in epsilons)} = {composed:g} per weight scalar, not the ε of one "
            "release (basic composition, from each institution's own privacy odometer; the budget given to the "
            f"institutions is exactly that). The report below is the ε = {EPSILON:g} release, with the running total "
            "at that point; the last table gives each institution's total after every release of the last seed "
            "(each seed trains new models, with odometers of their own).\n\n"
            if len(epsilons) > 1 else
            f"Each institution releases its model once, at ε = {EPSILON:g} per weight scalar (its odometer's "
            "total; see the last table below).\n\n")
    section = (
        f"## Step 4, PrivFusion: fusing institutions' models\n\n"
        f"{PARTIES} institutions each train an MLP ({x.shape[1]}-64-64-{n_classes}) for `{task}` on their own "
        f"users' GGSM embeddings and simple features (different initialisations). Each institution is a Flower "
        f"ClientApp holding only its own model and data files; the hub is a ServerApp that relays released tensors "
        f"and never holds a raw weight (engine: `{ctx.config.engine}`). Each party clips and perturbs every released "
        f"weight with the hybrid LDP mechanism (noise from the operating system's CSPRNG) at per-scalar "
        f"ε in {{{', '.join(f'{e:g}' for e in epsilons)}}}; the parties match hidden units to a reference and "
        "average; the fuser trains the perturbation filter adapter on a public calibration set of 10% of users. "
        "Without DP (the two reference rows) the raw weights would reach the hub, so those run in one process. "
        f"Test set: 20% of users; {len(ctx.seeds)} seed(s), mean ± std.\n\n"
        + warnings_markdown(warnings) + markdown_table(rows) + "\n" + figures + f"\n**Verdict.** {verdict}\n\n"
        + cost
        + privacy_report_markdown(ledgers, heading=f"### Privacy report (ε = {EPSILON:g}, last seed)")
        + "\n" + markdown_table([{"institution": k, "ε per weight scalar, all releases of its model": f"{v:g}"}
                                 for k, v in spent.items()]) + "\n"
    )
    metrics = {"task": task, "epsilon": EPSILON, "epsilons": list(epsilons), "parties": PARTIES,
               "engine": ctx.config.engine, "results": summary, "verdict": verdict,
               "privacy": privacy_report(ledgers), "composed_epsilon_per_institution": spent}
    ours = summary[f"PrivFusion ε={EPSILON:g} + adapter"]["auc"]
    alone = summary["each institution alone (mean)"]["auc"]
    ensemble = summary["logit ensemble (not private, upper bound)"]["auc"]
    summary_rows = [{
        "measure": f"test AUC ({task}), per-scalar ε = {EPSILON:g} (this release; {composed:g} spent per "
                   f"institution over the {len(epsilons)} release(s) of this step)",
        "ours": f"PrivFusion + adapter {mean_std(ours)}",
        "baseline beside it": f"an institution alone {mean_std(alone)}; non-private ensemble {mean_std(ensemble)}",
        "verdict": f"{compare_word(ours, alone)} an institution alone; {compare_word(ours, ensemble)} the "
                   "non-private ensemble",
    }]
    return StepResult(metrics, section, warnings, summary=summary_rows)


def _verdict(summary: dict[str, dict[str, list[float]]], epsilons: tuple[float, ...]) -> str:
    """One line the numbers support: PrivFusion + adapter against an institution alone and the calibration set.

    A gap within the larger of the two seed spreads (std over seeds) is "level with", not above or below
    (``compare_word``); with one seed there is no spread and no verdict.
    """
    alone, calib = summary["each institution alone (mean)"]["auc"], summary["calibration set alone"]["auc"]
    if not (np.isfinite(defined_mean_std(alone)[0]) and np.isfinite(defined_mean_std(calib)[0])):
        return "not defined (a test split holds one class)."
    parts = []
    for e in epsilons:
        ours = summary[f"PrivFusion ε={e:g} + adapter"]["auc"]
        if not np.isfinite(defined_mean_std(ours)[0]):
            parts.append(f"ε={e:g}: not defined")
            continue
        words = [compare_word(ours, ref) + " " + name
                 for name, ref in (("an institution alone", alone), ("the calibration set alone", calib))]
        parts.append(f"ε={e:g}: {mean_std(ours)}, {', '.join(words)}")
    return (f"PrivFusion + adapter AUC against an institution alone ({mean_std(alone)}) and the "
            f"calibration set alone ({mean_std(calib)}); a gap within the seed spread is 'level': "
            + "; ".join(parts) + ".")


def _epsilon_curve(ctx: DemoContext, summary: dict[str, dict[str, list[float]]], epsilons: tuple[float, ...],
                   task: str) -> Path:
    """Test AUC against per-scalar ε, with and without the adapter, beside the two references (mean ± std
    over seeds as error bars)."""
    def points(labels: list[str]) -> tuple[list[float], list[float], list[float]]:
        stats = [defined_mean_std(summary[label]["auc"]) for label in labels]
        return list(epsilons), [m for m, _ in stats], [sd for _, sd in stats]

    curve = {name: points([f"PrivFusion ε={e:g}{suffix}" for e in epsilons])
             for name, suffix in (("PrivFusion, no adapter", ", no adapter"), ("PrivFusion + adapter", " + adapter"))}
    for ref in ("each institution alone (mean)", "logit ensemble (not private, upper bound)"):
        curve[ref] = points([ref] * len(epsilons))
    return line_plot(ctx.run.plot_path("fuse_epsilon"), curve, xlabel="per-scalar ε", ylabel=f"test AUC ({task})",
                     title="PrivFusion: AUC against the privacy budget", logx=True, chance=0.5)
