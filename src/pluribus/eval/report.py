"""Reports: markdown tables, mean ± std formatting and PNG plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pluribus.io import atomic_path

#: How a number that does not exist (the AUC of a one-class split, a mean of nothing) is shown: never 0.000 or nan.
NOT_DEFINED = "not defined"
#: compare_word's answer when a side has a single run: no spread, so no verdict.
ONE_RUN = "not compared (one run) with"


def is_defined(value: Any) -> bool:
    """Whether ``value`` is a finite number (NaN and inf stand for a metric that is not defined)."""
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def mean_std(values: Sequence[float] | np.ndarray, digits: int = 3) -> str:
    """'mean ± std' of the defined values (population std, as over seeds); 'not defined' if none is, and a
    note of how many are when only some are.

    Args:
        values: the values.
        digits: decimals shown.
    """
    arr = np.asarray(values, dtype=float).ravel()
    finite = arr[np.isfinite(arr)]
    if len(finite) == 0:
        return NOT_DEFINED
    if len(arr) == 1:  # no spread to show: '± 0.000' would read as a measured, perfectly stable number
        return f"{finite[0]:.{digits}f} (one run)"
    text = f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f}"
    if len(finite) < len(arr):
        text += f" ({len(finite)} of {len(arr)} defined)"
    return text


def defined_mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, population std) of the defined values; (nan, 0.0) if none is."""
    arr = np.asarray(values, dtype=float).ravel()
    finite = arr[np.isfinite(arr)]
    return (float(finite.mean()), float(finite.std())) if len(finite) else (float("nan"), 0.0)


def compare_word(ours: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray, *,
                 higher_is_better: bool = True) -> str:
    """'above', 'below' or 'level with': ours against a reference over seeds (or folds).

    A gap within the larger of the two spreads (std over the values) is 'level with': a verdict the numbers
    support, not one that reads noise as a win. 'not defined' if either side has no defined value, and
    'not compared (one run) with' if either has only one (no spread to judge a gap by)."""
    mine, mine_sd = defined_mean_std(ours)
    ref, ref_sd = defined_mean_std(reference)
    if not (np.isfinite(mine) and np.isfinite(ref)):
        return NOT_DEFINED
    if min(np.isfinite(np.asarray(v, dtype=float)).sum() for v in (ours, reference)) < 2:
        return ONE_RUN
    return gap_word(mine - ref if higher_is_better else ref - mine, max(mine_sd, ref_sd))


def gap_word(gap: float, spread: float) -> str:
    """'above' / 'below' for a gap (better minus worse is positive) larger than ``spread``, else 'level with'."""
    return "above" if gap > spread else "below" if gap < -spread else "level with"


def metric_text(value: Any, digits: int = 3) -> str:
    """A metric as text: 'not defined' for NaN or inf."""
    return f"{float(value):.{digits}f}" if is_defined(value) else NOT_DEFINED


def split_warnings(
    split: str, labels: Mapping[str, Sequence[Any] | np.ndarray], *, min_users: int = 20, classes: Mapping[str, int] | None = None
) -> list[str]:
    """Warnings for a split too small to measure on: fewer than ``min_users`` users, or a task's class missing
    from it (its AUC is then not defined). ``labels`` maps task -> the split's labels; ``classes`` task -> how
    many classes the task has (default: 2)."""
    out = []
    sizes = {task: len(np.asarray(y)) for task, y in labels.items()}
    smallest = min(sizes.values(), default=0)
    if smallest < min_users:
        out.append(f"the {split} split has {smallest} labelled users (fewer than {min_users}): its numbers are noisy")
    for task, y in labels.items():
        present = len(np.unique(np.asarray(y)))
        wanted = (classes or {}).get(task, 2)
        if present < wanted:
            out.append(f"task '{task}': the {split} split holds {present} of its {wanted} classes, so its AUC is "
                       f"{'not defined' if present < 2 else 'over the classes present only'}")
    return out


def warnings_markdown(warnings: Sequence[str]) -> str:
    """Warnings as a markdown block quote (empty text when there are none)."""
    if not warnings:
        return ""
    return "\n>\n".join(f"> **Warning:** {w}" for w in warnings) + "\n\n"


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}" if np.isfinite(value) else NOT_DEFINED
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (columns default to the first row's keys).

    Args:
        rows: one mapping per row.
        columns: the columns in order (default: the first row's keys).
        digits: decimals of floats.
    """
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns) if columns is not None else list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, ""), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]] | tuple[Sequence[float], Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    chance: float | None = None,
) -> Path:
    """Save a PNG with one line per series name: (xs, ys), or (xs, ys, stds) for error bars (e.g. over seeds).

    Integer x values (steps) get integer ticks; on a log x axis the ticks are the xs themselves. With
    ``chance`` (0.5 for AUC) a dashed chance line is drawn and the y axis spans chance to 1, as in ``bar_plot``.

    Args:
        path: the PNG to write.
        series: name -> (x, y) or (x, y, error).
        xlabel: the x axis label.
        ylabel: the y axis label.
        title: the title.
        logx: a logarithmic x axis.
        chance: a dashed chance line at this y, or None.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    lows, highs = [], []
    for name, (xs, ys, *rest) in series.items():
        marker = "o" if len(xs) < 30 else None
        if rest:
            ax.errorbar(xs, ys, yerr=rest[0], marker=marker, capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker=marker, label=name)
        errs = rest[0] if rest else [0.0] * len(ys)
        lows += [y - e for y, e in zip(ys, errs, strict=True) if np.isfinite(y)]
        highs += [y + e for y, e in zip(ys, errs, strict=True) if np.isfinite(y)]
    if logx:
        ax.set_xscale("log")
        ticks = sorted({float(x) for xs, *_ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif all(float(x).is_integer() for xs, *_ in series.values() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if chance is not None:
        _chance_axis(ax, chance, lows, highs)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _chance_axis(ax: Any, chance: float, lows: Sequence[float], highs: Sequence[float]) -> None:
    """A dashed chance line, and a y axis from just below chance (or the lowest value) to 1: gaps shown
    against the whole chance-to-perfect range, not magnified by a tight axis."""
    ax.axhline(chance, color="0.3", linestyle="--", linewidth=1, label=f"chance ({chance:g})")
    ax.set_ylim(max(0.0, min([chance, *lows]) - 0.05), max([1.0, *highs]))


def bar_plot(
    path: str | Path,
    values: Mapping[str, Mapping[str, tuple[float, float]]] | Mapping[str, tuple[float, float]],
    *,
    ylabel: str,
    title: str,
    chance: float | None = None,
) -> Path:
    """Save a PNG bar chart with error bars; values are {bar: (mean, std)} or {group: {bar: (mean, std)}}.

    Undefined values (NaN) get no bar, and a group with no defined value is left out. The y axis starts at
    0, or, with ``chance`` (e.g. 0.5 for AUC), a dashed chance line is drawn and the axis spans from just
    below chance (or the lowest bar) to 1, so gaps are shown against the whole chance-to-perfect range.

    Args:
        path: the PNG to write.
        values: bar -> (mean, std), or group -> bar -> (mean, std).
        ylabel: the y axis label.
        title: the title.
        chance: a dashed chance line at this y, or None.
    """
    plt = _pyplot()
    first = next(iter(values.values()))
    groups_all: Mapping[str, Mapping[str, tuple[float, float]]] = (
        values if isinstance(first, Mapping) else {k: {"": v} for k, v in values.items()}  # type: ignore[assignment,dict-item]
    )
    groups = {g: bars for g, bars in groups_all.items() if any(np.isfinite(m) for m, _ in bars.values())}
    bars = list(dict.fromkeys(b for g in groups.values() for b in g))
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(groups) * max(1, len(bars)) / 2), 4.0), dpi=120)
    x = np.arange(len(groups))
    for i, bar in enumerate(bars):
        means = [groups[g].get(bar, (np.nan, 0.0))[0] for g in groups]
        stds = [groups[g].get(bar, (np.nan, 0.0))[1] for g in groups]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=bar)
    ax.set_xticks(x, list(groups), rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    if not groups:
        ax.text(0.5, 0.5, "no defined values", ha="center", va="center", transform=ax.transAxes)
    if chance is not None:
        _chance_axis(ax, chance, [m - s for g in groups.values() for m, s in g.values() if np.isfinite(m)],
                     [m + s for g in groups.values() for m, s in g.values() if np.isfinite(m)])
    else:
        ax.set_ylim(bottom=0.0)
    if len(bars) > 1 or chance is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
