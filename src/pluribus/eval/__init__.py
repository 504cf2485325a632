"""Evaluation kit: linear probes, multi-task summaries and reports."""

from pluribus.eval.multitask import delta_m
from pluribus.eval.probes import ProbeResult, ks_statistic, linear_probe, probe_tasks, probe_train_test
from pluribus.eval.report import bar_plot, line_plot, markdown_table, mean_std

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
