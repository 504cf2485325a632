"""Run folders: config.toml, metrics.json, report.md, plots and checkpoints, resumable step by step.

A run folder is the one place a long command writes to. Every file in it is written atomically, and a
step is marked done only after its outputs are written, so a rerun skips finished steps and redoes the
rest (``RunFolder.is_done`` / ``mark_done``).
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
import torch

from pluribus.config import config_to_dict, save_config
from pluribus.errors import ConfigError, DataError
from pluribus.io import (
    json_text,
    load_tensor_metadata,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
    write_text,
)

_CHECKPOINT_META = "pluribus_checkpoint"  # safetensors metadata key holding a checkpoint's JSON metadata


class RunFolder:
    """A run's folder: create it, or reopen it to resume when the config is the same."""

    def __init__(self, path: str | Path, config: Any | None = None, *, resume: bool = True) -> None:
        self.path = Path(path)
        self.config = config
        existing_config = self.path / "config.toml"
        if config is not None and existing_config.exists():
            old = tomllib.loads(existing_config.read_text(encoding="utf-8"))
            if not resume:
                raise ConfigError(f"{self.path} already holds a run; choose another --out or pass --resume")
            if old != _toml_roundtrip(config):
                raise ConfigError(
                    f"{self.path} holds a run with a different config; resume needs the same config "
                    f"(see {existing_config}), or choose another --out"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)
        if config is not None:
            save_config(config, existing_config)

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


def _toml_roundtrip(config: Any) -> dict[str, Any]:
    return tomllib.loads(tomli_w.dumps(config_to_dict(config)))
