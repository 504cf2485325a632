"""Atomic file writes, safetensors and JSON: a crash or a bad input never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pluribus.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are saved or loaded: `pluribus --help` stays fast
    import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_text(obj: Any) -> str:
    """``obj`` as JSON text (numpy scalars and arrays, tensors and paths are converted)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (numpy scalars and arrays are converted)."""
    return write_text(path, json_text(obj) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a malformed file raises DataError naming it and the line."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=p)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON: {err.msg}", path=p, line=err.lineno) from None


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (tensors are made contiguous CPU copies)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        from safetensors.torch import save_file

        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle)."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=p)
    try:
        from safetensors.torch import load_file

        return load_file(str(p))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"not a readable safetensors file: {err}", path=p) from None


def load_tensor_metadata(path: str | Path, key: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors file's metadata; DataError naming the file if the
    file is unreadable or the key is missing or not a JSON object."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", path=p)
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(key)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"not a readable safetensors file: {err}", path=p) from None
    if raw is None:
        raise DataError(f"no {key!r} metadata", path=p, field=key)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"metadata {key!r} is not JSON: {err.msg}", path=p, field=key) from None
    if not isinstance(meta, dict):
        raise DataError(f"metadata {key!r} is not a JSON object", path=p, field=key)
    return meta


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):  # a tensor (torch loaded by then)
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
