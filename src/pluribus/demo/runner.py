"""`pluribus demo`: the chain of systems on real data, one resumable step at a time.

Each step writes its metrics (metrics.json, under the step's name), a markdown section
(``sections/<step>.md``) and any plots into the run folder, then marks itself done. A rerun with the
same options skips finished steps; a failing step stops the run with a message naming it, leaving
the earlier steps' outputs as they were. The report is rebuilt from the sections after every step.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markdown import Markdown

from pluribus.data.schema import UserDataset
from pluribus.data.store import load_user_data
from pluribus.demo.steps import STEP_FUNCTIONS, STEP_NAMES
from pluribus.errors import ConfigError, PluribusError
from pluribus.eval.report import markdown_table
from pluribus.io import write_text
from pluribus.progress import heartbeat
from pluribus.runs import RunFolder
from pluribus.threads import cpu_threads

_console = Console(stderr=True)

#: Users kept by --quick (a seeded sample) so that the whole chain runs in a few minutes on 2 CPU cores.
QUICK_USERS = 200


@dataclass(frozen=True)
class DemoConfig:
    """Options of one demo run (stored as the run folder's config.toml).

    Attributes:
        data: the data set (a path or a known name such as ``movielens-100k``).
        quick: the small, fast settings (minutes) instead of the full ones.
        seeds: how many seeds each step repeats.
        engine: the Flower engine of the federated steps (``inprocess`` or ``simulation``).
    """

    data: str = "movielens-100k"
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    engine: str = "inprocess"  # how the federate and fuse steps run Flower: inprocess | simulation | deployment


@dataclass
class StepResult:
    """What a step hands back: metrics for metrics.json and a markdown section for report.md.

    Attributes:
        metrics: numbers for metrics.json.
        section: the step's markdown section of report.md.
        warnings: lines the report shows as warnings.
        summary: one line for the report's summary table.
        timing_note: how the step's wall time was measured (shown with it).
    """

    metrics: dict[str, Any]
    section: str
    warnings: list[str] = field(default_factory=list)  # small-data warnings, also listed in the report's summary
    # rows of the report's closing summary: {"measure", "ours", "baseline beside it", "verdict"} (see SUMMARY_COLUMNS)
    summary: list[dict[str, str]] = field(default_factory=list)
    # what part of the step's time went where (e.g. "stage-1 embedding 12 s, warm cache"), shown in the time table
    timing_note: str = ""


#: The closing summary table's columns; the runner adds "step" in front.
SUMMARY_COLUMNS = ("measure", "ours", "baseline beside it", "verdict")


@dataclass
class DemoContext:
    """Shared state between steps: the config, the run folder and the loaded data.

    Attributes:
        config: the run's options.
        run: the run folder.
        data: the loaded data set.
    """

    config: DemoConfig
    run: RunFolder
    data: UserDataset

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds every step trains and probes with: one in quick mode, all of the config's otherwise."""
        return _run_seeds(self.config)

    def probe_tasks(self) -> list[str]:
        """The classification tasks every step probes its user features on."""
        return [name for name, task in self.data.tasks.items() if task.kind != "regression"]

    def save_artifact(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Keep a step's output (tensors + JSON) in the run folder for the steps after it.

        Args:
            name: the artifact's name (its file names in the run folder).
            tensors: the tensors to keep (safetensors).
            meta: JSON-able facts kept beside them.
        """
        self.run.save_checkpoint(f"artifact-{name}", tensors, {**meta, "user_ids": [str(u) for u in self.data.user_ids]})

    def artifact(self, name: str, *, needed_by: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A finished step's output; a clear error names the step to run first.

        Args:
            name: the artifact's name.
            needed_by: the step that needs it (named in the error).

        Raises:
            ConfigError: the step that writes it has not run in this run folder, or its saved output is for
                other users than this run's data.
        """
        saved = self.run.load_checkpoint(f"artifact-{name}")
        if saved is None:
            raise ConfigError(f"step '{needed_by}' needs the output of step '{name}'; run it first "
                              f"(e.g. --steps {name},{needed_by})")
        if saved[1].get("user_ids") != [str(u) for u in self.data.user_ids]:
            raise ConfigError(f"the saved output of step '{name}' in {self.run.path} is for other users than this "
                              "run's data; use a fresh --out folder")
        return saved

    def earlier_metrics(self, step: str) -> dict[str, Any]:
        """Metrics an earlier step logged (empty if it did not run).

        Args:
            step: the step's name.
        """
        value = self.run.metrics().get(step, {})
        return value if isinstance(value, dict) else {}


def _step_function(step: str) -> Callable[[DemoContext], StepResult]:
    module, function = STEP_FUNCTIONS[step]
    step_function: Callable[[DemoContext], StepResult] = getattr(importlib.import_module(module), function)
    return step_function


def _parse_steps(steps: str) -> tuple[str, ...]:
    if steps.strip() == "all":
        return STEP_NAMES
    chosen = tuple(s.strip() for s in steps.split(",") if s.strip())
    if not chosen:
        raise ConfigError(f"--steps {steps!r} names no step; name one or more of {', '.join(STEP_NAMES)} "
                          "(comma-separated), or 'all'")
    unknown = [s for s in chosen if s not in STEP_NAMES]
    if unknown:
        raise ConfigError(f"--steps: unknown demo step(s) {unknown}; steps are {list(STEP_NAMES)}")
    return tuple(s for s in STEP_NAMES if s in chosen)


#: Steps that read the users' behaviour sources (U2QT tokens feed every later system).
_NEEDS_SOURCES = ("tokenize", "encode", "federate", "fuse")


def _check_data_fits(dataset: UserDataset, chosen: tuple[str, ...], data: str) -> None:
    """A data set without what a chosen step needs fails before anything is written, naming the step."""
    probe_steps = [s for s in chosen if s != "data"]
    if probe_steps:
        dataset.require(needed_by=f"the demo's {probe_steps[0]} step", classification=True, origin=data)
    source_steps = [s for s in chosen if s in _NEEDS_SOURCES]
    if source_steps:
        dataset.require(needed_by=f"the demo's {source_steps[0]} step", sources=True, origin=data)


def _run_seeds(config: DemoConfig) -> tuple[int, ...]:
    """The seeds a run uses: one in quick mode, all of the config's otherwise."""
    return config.seeds[:1] if config.quick else config.seeds


def _write_report(run: RunFolder, config: DemoConfig) -> Path:
    timings = run.metrics().get("timings", {})
    parts = [
        "# pluribus demo\n",
        f"Data: `{config.data}`; quick: {config.quick}; seeds: {list(_run_seeds(config))}.\n",
    ]
    if config.quick:
        parts.append(f"> **--quick is a smoke test**: a {QUICK_USERS}-user sample, short training and one seed. Its "
                     "numbers show that the chain runs, not how well the methods work; see a full run for those.\n")
    warned = run.metrics().get("warnings", {})
    listed = [f"- {step}: {w}" for step in STEP_NAMES for w in warned.get(step, [])]
    if listed:
        parts.append("> **Small data.** Some numbers below are noisy or not defined:\n>\n"
                     + "\n".join(f"> {line}" for line in listed) + "\n")
    for step in STEP_NAMES:
        section = run.path / "sections" / f"{step}.md"
        if section.exists():
            parts.append(section.read_text(encoding="utf-8"))
    summary = run.metrics().get("summary", {})
    summary_rows = [{"step": step, **{c: row.get(c, "") for c in SUMMARY_COLUMNS}}
                    for step in STEP_NAMES for row in summary.get(step, [])]
    if summary_rows:
        spread = "one seed: no spread, a smoke test" if config.quick else f"mean ± std over {len(config.seeds)} seeds"
        parts.append("## Summary\n\nEach step against the baseline beside it (" + spread + "). A gap within the "
                     "seed spread reads 'level with'.\n\n" + markdown_table(summary_rows))
    if timings:
        notes = run.metrics().get("timing_notes", {})
        # in the chain's order (metrics.json keeps its keys sorted), with the steps' total
        timed = [s for s in STEP_NAMES if s in timings]
        rows = [{"step": s, "seconds": f"{float(timings[s]):.1f}", "of which": notes.get(s, "")} for s in timed]
        rows.append({"step": "**all steps**", "seconds": f"**{sum(float(timings[s]) for s in timed):.1f}**",
                     "of which": ""})
        parts.append("## Time per step\n\n" + markdown_table(rows))
    return run.write_report("\n".join(parts))


def run_demo(
    *, out: Path, data: str = "movielens-100k", steps: str = "all", quick: bool = False, engine: str = "inprocess",
    force: bool = False,
) -> Path:
    """Run (or resume) the demo chain into run folder ``out``; returns the report path.

    ``force`` starts ``out`` over even if it holds a run of other options.

    Args:
        out: the run folder (created, or resumed if it holds a run of the same options).
        data: the data set (a path or a known name).
        steps: ``all`` or a comma-separated list of step names (see ``STEP_NAMES``).
        quick: the small, fast settings.
        engine: the Flower engine of the federated steps.
        force: start ``out`` over if it holds a run of other options.

    Raises:
        ConfigError: an unknown step or engine, or ``out`` holds a run of other options without ``force``.
        PluribusError: a step failed (the message names the step and its error).
    """
    chosen = _parse_steps(steps)
    if engine not in ("inprocess", "simulation", "deployment"):
        raise ConfigError(f"--engine {engine!r}: choose inprocess, simulation or deployment")
    config = DemoConfig(data=data, quick=quick, engine=engine)
    dataset = load_user_data(data)  # bad data fails here, before anything is written
    _check_data_fits(dataset, chosen, data)
    if quick and dataset.n_users > QUICK_USERS:  # a seeded sample keeps --quick under 3 minutes on 2 cores
        chosen_users = np.random.default_rng(0).choice(dataset.user_ids, QUICK_USERS, replace=False)
        dataset = dataset.subset(sorted(chosen_users), name=f"{dataset.name} ({QUICK_USERS}-user sample)")
    run = RunFolder(out, config, force=force)
    done_before = [s for s in run.done_steps() if s in STEP_NAMES]
    if done_before:
        _console.print(f"resumed from {run.path}: step(s) {', '.join(done_before)} finished in an earlier run",
                       markup=False, highlight=False)
    ctx = DemoContext(config, run, dataset)
    for step in chosen:
        if run.is_done(step):
            _console.print(f"[dim]step {step}: done in an earlier run, skipped[/dim]")
            continue
        _console.rule(f"[bold]{step}")
        start = time.perf_counter()
        try:
            # one CPU thread for the steps' small models (pluribus.threads: 4-30x faster on a shared 2-core
            # machine); stage-1 embedding asks for every core itself
            with heartbeat(f"demo step {step}"), cpu_threads(1):
                result = _step_function(step)(ctx)
        except PluribusError as err:
            raise PluribusError(f"demo step '{step}' failed: {err}") from err
        except Exception as err:  # an unexpected failure still names the step and keeps earlier outputs
            raise PluribusError(f"demo step '{step}' failed unexpectedly: {type(err).__name__}: {err}") from err
        elapsed = time.perf_counter() - start
        run.log_metrics(step, result.metrics)
        run.log_metrics("warnings", {step: result.warnings})
        run.log_metrics("summary", {step: result.summary})
        run.log_metrics("timing_notes", {step: result.timing_note})
        run.log_metrics("timings", {step: elapsed})
        write_text(run.path / "sections" / f"{step}.md", result.section)
        run.mark_done(step, {"seconds": elapsed})
        _write_report(run, config)
        _console.print(Markdown(result.section))
        _console.print(f"step {step} done in {elapsed:.1f} s", markup=False, highlight=False)
    return _write_report(run, config)
