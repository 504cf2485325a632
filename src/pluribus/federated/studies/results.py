"""What a FedBone run produced (in-process, baseline or Flower alike) and the run folder it is written to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pluribus.federated.core.config import FedBoneConfig
from pluribus.federated.core.task import ClientTask


@dataclass
class RunResult:
    """What a run produced: final per-client test metrics, the evaluation curve, bytes, faults, time.

    Attributes:
        config: the run's settings.
        tasks: the clients' task names, in client order.
        final: ``'<index>:<task>'`` -> that client's final test metrics.
        curve: one row of test metrics per evaluation during training.
        bytes: bytes exchanged, by message type, and the training bytes per step.
        faults: client steps lost to a fault (no answer, a late, stale or refused reply).
        quarantined: client contributions left out of a step for non-finite values (embeddings or gradients).
        mean_conflict_fraction: the mean over steps of the share of conflicting client-gradient pairs.
        wall_s: the run's wall time in seconds.
        steps_done: global steps trained.
        general_model: the trained server model (FedBone), or None.
        fault_log: one row per fault.
        interrupted_fault_log: faults of an earlier, interrupted attempt after its last committed checkpoint.
        conflict: medians over the steps of the client gradients' conflicts.
    """

    config: FedBoneConfig
    tasks: list[str]
    final: dict[str, dict[str, float]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    bytes: dict[str, Any] = field(default_factory=dict)
    faults: int = 0
    quarantined: int = 0
    mean_conflict_fraction: float = float("nan")
    wall_s: float = 0.0
    steps_done: int = 0
    general_model: torch.nn.Module | None = None
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    # faults of an earlier, interrupted attempt after its last committed checkpoint (Flower runs with a run folder)
    interrupted_fault_log: list[dict[str, Any]] = field(default_factory=list)
    # medians over the steps of the client gradients' conflicts (``LoopTally.conflict_summary``)
    conflict: dict[str, float] = field(default_factory=dict)

    def primary(self, suite_tasks: list[ClientTask]) -> dict[str, float]:
        """Each client's primary metric, keyed '<index>:<task>'.

        Args:
            suite_tasks: the clients' tasks, in client order.
        """
        return {f"{k}:{t.name}": self.final[f"{k}:{t.name}"][t.primary_metric] for k, t in enumerate(suite_tasks)}

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view for metrics files."""
        return {"tasks": self.tasks, "final": self.final, "curve": self.curve, "bytes": self.bytes,
                "faults": self.faults, "quarantined": self.quarantined,
                "mean_conflict_fraction": self.mean_conflict_fraction, "wall_s": self.wall_s,
                "steps_done": self.steps_done, "fault_log": self.fault_log,
                "interrupted_fault_log": self.interrupted_fault_log, "conflict": self.conflict}


def track_steps(steps: range, progress: bool, description: str) -> Any:
    """``steps`` with a progress bar (rate, ETA) when ``progress``."""
    if not progress:
        return steps
    from pluribus.progress import track

    return track(steps, total=len(steps), description=description)


def write_run_folder(folder: Any, result: RunResult, tensors: dict[str, torch.Tensor]) -> None:
    """The finished run's folder: final checkpoint, metrics, report (and a test-loss plot), done mark."""
    from pluribus.eval.report import markdown_table

    folder.save_checkpoint("final", tensors, {"steps_done": result.steps_done})
    folder.log_metrics("result", result.as_dict())
    rows = [{"client": k, **{m: round(v, 4) for m, v in vals.items()}} for k, vals in result.final.items()]
    lines = [f"# FedBone run ({result.config.algorithm}, suite {result.config.suite})", "",
             markdown_table(rows), "",
             f"- steps: {result.steps_done}; wall time: {result.wall_s:.1f} s",
             f"- bytes (total, all messages): {result.bytes.get('total', 0)}",
             f"- faults left out: {result.faults}; quarantined: {result.quarantined}",
             f"- mean conflict fraction: {result.mean_conflict_fraction:.3f}"]
    if result.conflict:
        lines.append("- client gradients, medians over the steps: "
                     + "; ".join(f"{k} {v:.3g}" for k, v in result.conflict.items() if k != "mean conflict fraction"))
    evals = [c for c in result.curve if isinstance(c.get("metrics"), dict)]
    if len(evals) > 1:
        from pluribus.eval.report import line_plot

        series = {k: ([c["step"] for c in evals if isinstance(c["metrics"].get(k), dict)],
                      [c["metrics"][k]["loss"] for c in evals if isinstance(c["metrics"].get(k), dict)])
                  for k in result.final}
        path = line_plot(folder.plot_path("test_loss"), series, xlabel="global step", ylabel="test loss",
                         title=f"{result.config.algorithm} on {result.config.suite}")
        lines += ["", f"![test loss]({path.name})"]
    folder.write_report("\n".join(lines) + "\n")
    folder.mark_done("train", {"steps": result.steps_done})
