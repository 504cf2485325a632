"""Run folders: config.toml, metrics.json, report.md, plots and checkpoints, resumable step by step.

A run folder is the one place a long command writes to. Every file in it is written atomically, and a
step is marked done only after its outputs are written, so a rerun skips finished steps and redoes the
rest (``RunFolder.is_done`` / ``mark_done``).

Inside a command (``command_session``, which ``pluribus.cli.main`` opens around every command) a run folder
is marked ``INCOMPLETE`` until the command succeeds. A command that fails removes a run folder it created
and wrote nothing into, and leaves any other one marked incomplete: the same command resumes it, and while
no step has finished and no checkpoint exists, the same command with corrected options takes it over.
``force=True`` (``--force``) starts a run folder over deliberately.
"""

from __future__ import annotations

import os
import shutil
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w
import torch

from pluribus.config import config_to_dict, save_config
from pluribus.errors import ConfigError, DataError
from pluribus.io import (
    ensure_folder,
    json_text,
    load_tensor_metadata,
    load_tensors,
    read_json,
    remove_empty_folders,
    save_tensors,
    write_json,
    write_text,
)

_CHECKPOINT_META = "pluribus_checkpoint"  # safetensors metadata key holding a checkpoint's JSON metadata
INCOMPLETE = "INCOMPLETE"  # marker file: the command writing this run folder has not finished

# The run folders opened by the command in progress (None outside a command: library use writes no marker).
_session: list[RunFolder] | None = None


@contextmanager
def command_session() -> Iterator[None]:
    """Around one command: on success its run folders lose their INCOMPLETE marker; on failure a run folder
    the command created but wrote nothing into is removed, and the others stay marked incomplete."""
    global _session
    outer, _session = _session, []
    opened = _session
    try:
        yield
    except BaseException as err:
        for run in reversed(opened):
            run._fail(err)
        raise
    else:
        for run in opened:
            run.complete()
    finally:
        _session = outer


def check_run_location(path: str | Path) -> None:
    """DataError naming ``path`` unless a run folder could be made there; creates nothing. For commands that do
    expensive work (load a model) before their run folder exists: a bad ``--out`` is refused first."""
    target = Path(path)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the deepest part of the path that exists
    if not probe.is_dir():
        raise DataError("cannot write here: a file is in the way where a folder is needed", path=target,
                        expected="a writable location")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"cannot write here: {probe} is not writable", path=target, expected="a writable location")


class RunFolder:
    """A run's folder: create it, or reopen it to resume when the config is the same.

    ``resume=False`` refuses a folder that already holds a run; ``force=True`` clears a folder that holds a run
    (of any config) and starts over. Without a config the folder is opened to read or add to, never created
    until something is written."""

    def __init__(self, path: str | Path, config: Any | None = None, *, resume: bool = True, force: bool = False,
                 keep: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.keep = keep  # top-level entries --force never clears (state that outlives a restart: an odometer)
        self.config = config
        self._created: list[Path] = []
        self._preexisting: dict[str, int] = {}  # top-level name -> mtime_ns when the run opened
        self._was_complete = False
        if config is None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: a file is in the way; a run folder must be a folder (choose another --out)")
        existing_config = self.path / "config.toml"
        if existing_config.exists():
            self._reopen(existing_config, config, resume=resume, force=force)
        self._preexisting = {p.name: p.stat().st_mtime_ns for p in self.path.iterdir()} if self.path.is_dir() else {}
        self._was_complete = existing_config.exists() and not (self.path / INCOMPLETE).exists()
        self._created = ensure_folder(self.path)
        try:
            (self.path / "checkpoints").mkdir(exist_ok=True)
            save_config(config, existing_config)
            if _session is not None:
                write_text(self.path / INCOMPLETE, _INCOMPLETE_TEXT)
                _session.append(self)
        except BaseException:
            self._discard_if_unused()
            raise

    def _reopen(self, existing_config: Path, config: Any, *, resume: bool, force: bool) -> None:
        try:
            old = tomllib.loads(existing_config.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            if not force:
                raise DataError(f"unreadable run config ({err}); pass --force to start this run over",
                                path=existing_config) from None
            old = None
        if force:
            self._clear()
            return
        if not resume:
            raise ConfigError(f"{self.path} already holds a run; choose another --out, pass --resume to continue "
                              "it, or --force to start over")
        if old == _toml_roundtrip(config):
            return
        if self.is_incomplete() and self._holds_no_progress():
            # a failed start with other options: nothing to lose, the corrected command takes it over
            for name in ("metrics.json", "report.md", INCOMPLETE):
                (self.path / name).unlink(missing_ok=True)
            return
        raise ConfigError(
            f"{self.path} holds a run with a different config; resume needs the same config "
            f"(see {existing_config}), or choose another --out, or pass --force to start over"
        )

    def _clear(self) -> None:
        """Empty a folder that holds a run (it has a config.toml, so everything in it is the run's)."""
        for entry in self.path.iterdir():
            if entry.name in self.keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _holds_no_progress(self) -> bool:
        steps = self.path / "steps"
        checkpoints = self.path / "checkpoints"
        return not (steps.is_dir() and any(steps.glob("*.done"))) and not (
            checkpoints.is_dir() and any(checkpoints.glob("*.safetensors")))

    def is_incomplete(self) -> bool:
        """Whether a command writing this folder stopped before it finished (the INCOMPLETE marker is there)."""
        return (self.path / INCOMPLETE).exists()

    def complete(self) -> None:
        """Mark the run finished: drop the INCOMPLETE marker (the CLI does this when a command succeeds)."""
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def _unused(self) -> bool:
        """Whether this run changed nothing in the folder besides its own bookkeeping (config and marker)."""
        if not self.path.is_dir():
            return True
        for entry in self.path.iterdir():
            if entry.name in ("config.toml", INCOMPLETE):
                continue
            if self._preexisting.get(entry.name) == entry.stat().st_mtime_ns:
                continue  # there before and untouched (a folder's time changes when an entry is added or renamed)
            if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
                continue
            return False
        return True

    def _discard_if_unused(self) -> bool:
        if not self._unused() or "config.toml" in self._preexisting:
            return False
        for name in ("config.toml", INCOMPLETE):
            (self.path / name).unlink(missing_ok=True)
        if "checkpoints" not in self._preexisting and (self.path / "checkpoints").is_dir():
            (self.path / "checkpoints").rmdir()
        remove_empty_folders(self._created)
        return True

    def _fail(self, err: BaseException) -> None:
        """After a failed command: remove what this run only set up, else keep the folder marked incomplete."""
        if self._discard_if_unused():
            return
        if self._was_complete and self._unused():
            self.complete()  # a finished run reopened by a command that failed before changing anything
            return
        reason = " ".join(str(err).split()) or type(err).__name__
        write_text(self.path / INCOMPLETE, _INCOMPLETE_TEXT + f"last failure: {reason}\n")

    # ---- metrics and report -------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        """Path of metrics.json."""
        return self.path / "metrics.json"

    def metrics(self) -> dict[str, Any]:
        """All metrics recorded so far."""
        return read_json(self.metrics_path) if self.metrics_path.exists() else {}

    def log_metrics(self, section: str, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into metrics.json under ``section`` (atomic rewrite)."""
        data = self.metrics()
        data.setdefault(section, {}).update(values)
        write_json(self.metrics_path, data)

    def write_report(self, markdown: str) -> Path:
        """Write report.md atomically."""
        return write_text(self.path / "report.md", markdown)

    def plot_path(self, name: str) -> Path:
        """Where a PNG plot called ``name`` goes."""
        return self.path / f"{name}.png"

    # ---- steps and checkpoints ----------------------------------------------------------------
    def is_done(self, step: str) -> bool:
        """Whether ``step`` finished in an earlier (or this) run."""
        return (self.path / "steps" / f"{step}.done").exists()

    def mark_done(self, step: str, info: Mapping[str, Any] | None = None) -> None:
        """Mark ``step`` finished; call only after its outputs are written."""
        write_json(self.path / "steps" / f"{step}.done", {"finished_at": time.time(), **(info or {})})

    def done_steps(self) -> list[str]:
        """Steps finished in earlier (or this) runs, oldest first."""
        folder = self.path / "steps"
        if not folder.is_dir():
            return []
        return [p.stem for p in sorted(folder.glob("*.done"), key=lambda p: p.stat().st_mtime_ns)]

    def checkpoint_path(self, name: str) -> Path:
        """Path of checkpoint ``name`` (safetensors)."""
        return self.path / "checkpoints" / f"{name}.safetensors"

    def save_checkpoint(self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Save a checkpoint as one atomic safetensors file whose metadata holds ``meta`` (JSON), so tensors and
        metadata can never come from two different saves; ``<name>.json`` is a readable copy."""
        text = json_text(dict(meta))
        save_tensors(self.checkpoint_path(name), tensors, metadata={_CHECKPOINT_META: text})
        write_text(self.path / "checkpoints" / f"{name}.json", text + "\n")

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint's tensors and metadata, or None if there is none (the metadata inside the file wins)."""
        path = self.checkpoint_path(name)
        if not path.exists():
            return None
        tensors = load_tensors(path)
        sidecar = self.path / "checkpoints" / f"{name}.json"
        try:
            return tensors, load_tensor_metadata(path, _CHECKPOINT_META)
        except DataError:
            if not sidecar.exists():
                raise
            return tensors, read_json(sidecar)  # a checkpoint written before the metadata moved into the file


_INCOMPLETE_TEXT = (
    "This run has not finished. Rerun the same command to resume it; pass --force to start it over.\n"
)


def _toml_roundtrip(config: Any) -> dict[str, Any]:
    return tomllib.loads(tomli_w.dumps(config_to_dict(config)))
