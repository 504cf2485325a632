"""Demo step 4, PrivFusion: institutions train task models on their own users' GGSM embeddings; the
models are fused under local differential privacy by neuron matching, then repaired by the adapter."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pluribus.data.split import split_indices
from pluribus.demo.basic import simple_features
from pluribus.demo.runner import DemoContext, StepResult
from pluribus.eval.report import bar_plot, markdown_table, mean_std, split_warnings, warnings_markdown

PARTIES = 4
EPSILON = 4.0


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
    x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int, quick: bool, task: str
) -> tuple[dict[str, dict[str, float]], Any, list[str]]:
    from pluribus.fusion import MLP, AdapterConfig, FusionConfig, privfusion
    from pluribus.fusion.models import train_model

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
    averaged = privfusion(parties, config=FusionConfig(epsilon=float("inf"), solver="identity", seed=seed))
    matched = privfusion(parties, config=FusionConfig(epsilon=float("inf"), seed=seed))
    private = privfusion(parties, config=FusionConfig(epsilon=EPSILON, seed=seed), calib=cal)
    repaired = privfusion(parties, config=FusionConfig(epsilon=EPSILON, seed=seed), calib=cal,
                          adapter=AdapterConfig(seed=seed))
    party_scores = [_scores(p, x_test, y_test) for p in parties]
    results = {
        "each institution alone (mean)": {k: float(np.mean([s[k] for s in party_scores])) for k in ("accuracy", "auc")},
        "calibration set alone": _scores(calib_only, x_test, y_test),
        "plain weight averaging (no DP)": _scores(averaged.model, x_test, y_test),
        "matched averaging (no DP)": _scores(matched.model, x_test, y_test),
        f"PrivFusion ε={EPSILON:g}, no adapter": _scores(private.model, x_test, y_test),
        f"PrivFusion ε={EPSILON:g} + adapter": _scores(repaired.model, x_test, y_test),
        "logit ensemble (not private, upper bound)": _scores(parties, x_test, y_test),
    }
    return results, repaired.all_ledgers, split_warnings(f"test (seed {seed})", {task: y_test.numpy()},
                                                        classes={task: n_classes})


def _defined_mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    return (float(np.mean(finite)), float(np.std(finite))) if finite else (float("nan"), 0.0)


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
    for seed in ctx.seeds:
        results, ledgers, seed_warnings = _one_seed(x, y, n_classes, seed, ctx.config.quick, task)
        per_seed.append(results)
        warnings += seed_warnings
    methods = list(per_seed[0])
    summary = {m: {k: [r[m][k] for r in per_seed] for k in ("accuracy", "auc")} for m in methods}
    rows = [{"model": m, "test AUC": mean_std(v["auc"]), "test accuracy": mean_std(v["accuracy"])}
            for m, v in summary.items()]
    plot = bar_plot(
        ctx.run.plot_path("fuse_auc"), {m: _defined_mean_std(v["auc"]) for m, v in summary.items()},
        ylabel=f"test AUC ({task})", title=f"PrivFusion of {PARTIES} institutions' models", chance=0.5,
    )
    assert ledgers is not None
    section = (
        f"## Step 4, PrivFusion: fusing institutions' models\n\n"
        f"{PARTIES} institutions each train an MLP ({x.shape[1]}-64-64-{n_classes}) for `{task}` on their own "
        f"users' GGSM embeddings and simple features (different initialisations). The models are fused without retraining: each party "
        f"clips and perturbs every released weight with the hybrid LDP mechanism at ε = {EPSILON:g} per scalar, "
        "the fuser matches hidden units and averages, and the perturbation filter adapter is trained on a public "
        f"calibration set of 10% of users. Test set: 20% of users; {len(ctx.seeds)} seed(s), mean ± std.\n\n"
        + warnings_markdown(warnings) + markdown_table(rows) + f"\n![fusion AUC]({plot.name})\n\n"
        + privacy_report_markdown(ledgers, heading="### Privacy report (last seed)")
    )
    metrics = {"task": task, "epsilon": EPSILON, "parties": PARTIES, "results": summary,
               "privacy": privacy_report(ledgers)}
    return StepResult(metrics, section, warnings)
