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


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask sets it while reading)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(target: Path) -> int:
    """The permission bits a new file at ``target`` gets: the old file's if it exists, else 0o666 less the umask
    (what ``open()`` gives; ``mkstemp`` would give 0o600, unreadable to colleagues sharing a folder)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _write_error(target: Path, err: OSError) -> DataError:
    reason = err.strerror or type(err).__name__
    if isinstance(err, NotADirectoryError | FileExistsError):
        reason = "a file is in the way where a folder is needed"
    elif isinstance(err, IsADirectoryError):
        reason = "a folder is in the way where a file is needed"
    return DataError(f"cannot write here: {reason}", path=target, expected="a writable location")


def ensure_folder(path: str | Path) -> list[Path]:
    """Create folder ``path`` and its parents; returns the folders it created, deepest last. A file in the way
    or a read-only place raises DataError naming the folder."""
    folder = Path(path)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_empty_folders(missing[::-1])
        raise _write_error(folder, err) from None
    return missing[::-1]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (as ensure_folder returned them, deepest last) where they are empty: undoes a mkdir."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): the folders above it are not empty either


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the user's umask (as ``open()`` would), and a path that cannot be written (a file where a
    folder is needed, a read-only place, a folder in the way) raises DataError naming it, before any work."""
    target = Path(path)
    if target.is_dir():
        raise _write_error(target, IsADirectoryError())
    created = ensure_folder(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        remove_empty_folders(created)
        raise _write_error(target, err) from None
    os.close(fd)
    tmp = Path(tmp_name)
    done = False
    try:
        os.chmod(tmp, file_mode(target))
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise _write_error(target, err) from None
        done = True
    finally:
        if tmp.exists():
            tmp.unlink()
        if not done:
            remove_empty_folders(created)


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
