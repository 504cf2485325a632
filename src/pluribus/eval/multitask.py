"""Multi-task summaries: the delta-m of a method relative to a reference."""

from __future__ import annotations

from collections.abc import Mapping

from pluribus.errors import DataError


def delta_m(
    metrics: Mapping[str, float], reference: Mapping[str, float], lower_is_better: Mapping[str, bool]
) -> float:
    """Mean relative gain over tasks in percent: (1/T) sum (-1)^l_t (M_t - R_t) / R_t * 100.

    Args:
        metrics: task -> the method's metric.
        reference: task -> the reference's metric (the same tasks).
        lower_is_better: task -> whether lower is better.

    Raises:
        DataError: no tasks, a task without a reference metric or direction, or a reference of 0.
    """
    if not metrics:
        raise DataError("no tasks to summarise", field="metrics")
    missing = [t for t in metrics if t not in reference or t not in lower_is_better]
    if missing:
        raise DataError(f"no reference metric or direction for task(s) {missing}", field="reference")
    total = 0.0
    for task, value in metrics.items():
        ref = reference[task]
        if ref == 0:
            raise DataError(f"reference metric of task '{task}' is 0; delta-m is undefined", field=task)
        sign = -1.0 if lower_is_better[task] else 1.0
        total += sign * (value - ref) / abs(ref)
    return 100.0 * total / len(metrics)
