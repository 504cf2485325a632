"""Linear probes on frozen features: logistic regression with AUC, KS and accuracy over seeds and folds."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pluribus.errors import DataError, ShapeError
from pluribus.threads import cpu_threads

if TYPE_CHECKING:
    from pluribus.data.schema import UserDataset

ProbeKind = Literal["binary", "multiclass"]


@dataclass(frozen=True)
class ProbeResult:
    """Mean and standard deviation of probe metrics over every (seed, fold).

    Attributes:
        auc_mean: mean ROC AUC (multiclass: the mean of the one-vs-rest AUCs).
        auc_std: its standard deviation.
        ks_mean: mean Kolmogorov-Smirnov statistic (multiclass: the mean over one-vs-rest).
        ks_std: its standard deviation.
        acc_mean: mean accuracy.
        acc_std: its standard deviation.
        n: the number of labelled samples.
        folds: the metrics of every (seed, fold).
        warnings: why a number is less reliable or not defined (small data).
    """

    auc_mean: float
    auc_std: float
    ks_mean: float
    ks_std: float
    acc_mean: float
    acc_std: float
    n: int
    folds: list[dict[str, float]] = field(default_factory=list, repr=False)
    warnings: tuple[str, ...] = ()  # why a number is less reliable or not defined (small data)

    def as_dict(self) -> dict[str, float]:
        """Scalar metrics (no per-fold details, no warnings)."""
        return {k: v for k, v in asdict(self).items() if k not in ("folds", "warnings")}

    @property
    def defined(self) -> bool:
        """Whether the probe produced numbers (False when the data had too few users of a class)."""
        return bool(np.isfinite(self.auc_mean))


def ks_statistic(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of a binary scorer: max(TPR - FPR) over thresholds.

    Args:
        y_true: binary labels.
        scores: the classifier's scores.
    """
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(np.max(tpr - fpr))


def _scores(model: object, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(x)  # type: ignore[attr-defined]


def _metrics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray, kind: ProbeKind) -> dict[str, float]:
    predicted = classes[np.argmax(proba, axis=1)]
    if kind == "binary":
        positive = proba[:, 1]
        if len(np.unique(y)) < 2:  # a one-class test set: AUC and KS do not exist (never report them as 0)
            return {"auc": float("nan"), "ks": float("nan"), "acc": float(accuracy_score(y, predicted))}
        return {"auc": float(roc_auc_score(y, positive)), "ks": ks_statistic(y, positive),
                "acc": float(accuracy_score(y, predicted))}
    present = [i for i, c in enumerate(classes) if 0 < np.sum(y == c) < len(y)]
    if not present:  # a one-class test set: one-vs-rest AUC and KS do not exist
        return {"auc": float("nan"), "ks": float("nan"), "acc": float(accuracy_score(y, predicted))}
    aucs = [roc_auc_score(y == classes[i], proba[:, i]) for i in present]
    kss = [ks_statistic((y == classes[i]).astype(int), proba[:, i]) for i in present]
    return {"auc": float(np.mean(aucs)), "ks": float(np.mean(kss)), "acc": float(accuracy_score(y, predicted))}


def _check(x: np.ndarray, y: np.ndarray, kind: ProbeKind) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ShapeError("probe features", x.shape, "[n_samples, n_features]")
    if y.ndim != 1 or len(y) != len(x):
        raise ShapeError("probe labels", y.shape, f"[{len(x)}]")
    if not np.isfinite(x).all():
        raise DataError("probe features contain NaN or inf", field="features", expected="finite values")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"labels have one class only ({classes.tolist()})", field="labels",
                        expected="at least two classes")
    if kind == "binary" and len(classes) > 2:
        raise DataError(f"binary probe got {len(classes)} classes", field="labels", expected="two classes")
    return x, y


def _model(seed: int, c: float) -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))


def probe_train_test(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    kind: ProbeKind = "binary",
    c: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a logistic-regression probe on one split and score the other: auc, ks, acc.

    Args:
        x_train: training features ``[n, d]``.
        y_train: training labels.
        x_test: test features.
        y_test: test labels.
        kind: ``binary``, ``multiclass`` or ``regression``.
        c: the inverse regularisation strength.
        seed: the solver's seed.

    Raises:
        ShapeError: features not 2-D, or labels or test features that do not match them.
        DataError: non-finite features, one class only, or more than two classes for a binary probe.
    """
    x_train, y_train = _check(x_train, y_train, kind)
    x_test = np.asarray(x_test, dtype=np.float64)
    if x_test.ndim != 2 or x_test.shape[1] != x_train.shape[1]:
        raise ShapeError("probe test features", x_test.shape, f"[*, {x_train.shape[1]}]")
    model = _model(seed, c)
    # one BLAS thread: a probe is a small problem, and a second OpenBLAS thread spinning for a busy core made a
    # 5-fold probe of 1,152-d embeddings 31x slower on the shared 2-core machine (pluribus.threads)
    with warnings.catch_warnings(), cpu_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)  # type: ignore[attr-defined]
        scores = _scores(model, x_test)
    classes = model.classes_  # type: ignore[attr-defined]
    return _metrics(np.asarray(y_test), scores, classes, kind)


def linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: ProbeKind = "binary",
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 5,
    c: float = 1.0,
) -> ProbeResult:
    """Stratified k-fold logistic-regression probe, repeated over seeds; mean ± std of AUC, KS, accuracy.

    Args:
        x: features ``[n, d]``.
        y: labels ``[n]``.
        kind: ``binary``, ``multiclass`` or ``regression``.
        seeds: the fold shuffles' seeds.
        folds: the number of folds.
        c: the inverse regularisation strength.

    Raises:
        ShapeError: features not 2-D, or labels that do not match them.
        DataError: non-finite features, one class only, more than two classes for a binary probe, or a class
            with fewer samples than folds.
    """
    x, y = _check(x, y, kind)
    smallest = int(np.min(np.unique(y, return_counts=True)[1]))
    if smallest < folds:
        raise DataError(f"the rarest class has {smallest} samples, fewer than folds={folds}", field="labels",
                        expected=f"at least {folds} samples per class")
    rows = []
    for seed in seeds:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fold, (train, test) in enumerate(splitter.split(x, y)):
            scores = probe_train_test(x[train], y[train], x[test], y[test], kind=kind, c=c, seed=seed)
            rows.append({"seed": seed, "fold": fold, **scores})
    arr = {k: np.array([r[k] for r in rows]) for k in ("auc", "ks", "acc")}
    return ProbeResult(
        float(arr["auc"].mean()), float(arr["auc"].std()), float(arr["ks"].mean()), float(arr["ks"].std()),
        float(arr["acc"].mean()), float(arr["acc"].std()), len(y), rows,
    )


def probe_tasks(
    x: np.ndarray,
    ds: UserDataset,
    tasks: Iterable[str] | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 5,
    c: float = 1.0,
) -> dict[str, ProbeResult]:
    """Probe features ``x`` (one row per user of ``ds``, in order) on each classification task (``c``: the
    logistic regression's inverse L2 strength).

    Args:
        x: features ``[users, d]``, in the data set's user order.
        ds: the data set whose labels are probed.
        tasks: the tasks (default: all).
        seeds: the fold shuffles' seeds.
        folds: the number of folds.
        c: the inverse regularisation strength.

    Raises:
        DataError: an unknown or regression task, or labels a probe cannot use (see :func:`linear_probe`).
        ShapeError: ``x`` has not one row per user.
    """
    x = np.asarray(x)
    if x.ndim != 2 or len(x) != ds.n_users:
        raise ShapeError("user features", x.shape, f"[{ds.n_users}, n_features] (one row per user)")
    names = list(tasks) if tasks is not None else [t for t, s in ds.tasks.items() if s.kind != "regression"]
    out = {}
    for name in names:
        spec = ds.task(name)
        if spec.kind == "regression":
            raise DataError(f"task '{name}' is a regression task", field=name, expected="a classification task")
        mask, y = ds.label_array(name)
        out[name] = _probe_small_data(name, x[mask], y, kind=spec.kind, seeds=seeds, folds=folds, c=c)
    return out


def _probe_small_data(
    name: str, x: np.ndarray, y: np.ndarray, *, kind: ProbeKind, seeds: Sequence[int], folds: int, c: float = 1.0
) -> ProbeResult:
    """linear_probe, with fewer folds when a class is rarer than ``folds`` and no numbers (NaN, with a warning)
    when a class has fewer than 2 users: a data set too small for the probe says so instead of failing."""
    counts = np.unique(y, return_counts=True)[1]
    smallest = int(counts.min()) if len(counts) > 1 else 0
    if smallest < 2:
        why = (f"task '{name}': {len(y)} labelled users in {len(counts)} class(es); a probe needs two classes of "
               "at least 2 users each, so its AUC is not defined")
        nan = float("nan")
        return ProbeResult(nan, nan, nan, nan, nan, nan, len(y), [], (why,))
    warnings: tuple[str, ...] = ()
    if smallest < folds:
        warnings = (f"task '{name}': the rarest class has {smallest} users, so the probe uses {smallest} folds "
                    f"instead of {folds}; its numbers are noisy",)
        folds = smallest
    result = linear_probe(x, y, kind=kind, seeds=seeds, folds=folds, c=c)
    return replace(result, warnings=warnings)
