"""Evaluation kit: linear probes, multi-task summaries and reports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.eval.multitask import delta_m
    from pluribus.eval.probes import ProbeResult, ks_statistic, linear_probe, probe_tasks, probe_train_test
    from pluribus.eval.report import bar_plot, line_plot, markdown_table, mean_std

_EXPORTS = {
    "delta_m": "multitask",
    "ProbeResult": "probes",
    "ks_statistic": "probes",
    "linear_probe": "probes",
    "probe_tasks": "probes",
    "probe_train_test": "probes",
    "bar_plot": "report",
    "line_plot": "report",
    "markdown_table": "report",
    "mean_std": "report",
}

__getattr__ = lazy_getattr("pluribus.eval", _EXPORTS)

__all__ = [
    "ProbeResult",
    "bar_plot",
    "delta_m",
    "ks_statistic",
    "line_plot",
    "linear_probe",
    "markdown_table",
    "mean_std",
    "probe_tasks",
    "probe_train_test",
]
