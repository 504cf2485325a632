"""Reading and writing user data sets: a folder (dataset.json + Parquet) or one JSONL file.

Folder layout::

    dataset.json            name, sources (text/numeric fields), tasks (kind, classes), meta
    sources/<name>.parquet  user_id, timestamp, fields...
    future/<name>.parquet   held-out future events (optional)
    profile.parquet         user_id + numeric or text columns (optional)
    labels.parquet          user_id + one column per task

JSONL: one user per line, ``{"user_id", "sources": {name: [event, ...]}, "profile": {...}, "labels": {...}}``
where an event is ``{"timestamp": seconds, "text": "...", <numeric field>: number}``. The schema is read
from a sidecar ``<file>.schema.json`` (the ``dataset.json`` format) when present, else inferred from the
first occurrence of each field. Every error names the file, the line and the field.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pluribus.data.locate import DATA_CHOICES
from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset
from pluribus.errors import ConfigError, DataError
from pluribus.io import atomic_path, ensure_folder, read_json, remove_empty_folders, write_json

FORMAT_VERSION = 1


# ---- schema as JSON -------------------------------------------------------------------------------
def schema_to_json(ds: UserDataset) -> dict[str, Any]:
    """The data set's schema and metadata as a JSON-ready dict (the dataset.json format)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": ds.name,
        "sources": {
            s.name: {"text_field": s.text_field, "numeric_fields": list(s.numeric_fields), "description": s.description}
            for s in ds.source_specs.values()
        },
        "tasks": {
            t.name: {"kind": t.kind, "classes": list(t.classes), "description": t.description} for t in ds.tasks.values()
        },
        "meta": {k: v for k, v in ds.meta.items() if isinstance(v, int | float | str | bool)},
    }


def schema_from_json(obj: Any, *, path: str | Path) -> tuple[list[SourceSpec], list[TaskSpec], dict[str, Any]]:
    """Parse a dataset.json-style schema; malformed entries name the field."""
    if not isinstance(obj, dict):
        raise DataError("schema must be a JSON object", path=path)
    sources, tasks = [], []
    for name, spec in _mapping(obj.get("sources", {}), path, "sources").items():
        _schema_name(name, "source name", path, "sources")
        spec = _mapping(spec, path, f"sources.{name}")
        numeric = spec.get("numeric_fields", [])
        if not isinstance(numeric, list) or not all(isinstance(f, str) for f in numeric):
            raise DataError("numeric_fields must be a list of names", path=path, field=f"sources.{name}.numeric_fields")
        for f in numeric:
            _schema_name(f, "field name", path, f"sources.{name}.numeric_fields")
        text_field = spec.get("text_field", "text")
        if text_field is not None:
            _schema_name(text_field, "field name", path, f"sources.{name}.text_field")
        sources.append(SourceSpec(name, text_field, tuple(numeric), str(spec.get("description", ""))))
    for name, spec in _mapping(obj.get("tasks", {}), path, "tasks").items():
        _schema_name(name, "task name", path, "tasks")
        spec = _mapping(spec, path, f"tasks.{name}")
        kind = spec.get("kind", "binary")
        if kind not in ("binary", "multiclass", "regression"):
            raise DataError(f"unknown task kind {kind!r}", path=path, field=f"tasks.{name}.kind",
                            expected="binary, multiclass or regression")
        classes = spec.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str | int) and not isinstance(c, bool) for c in classes):
            raise DataError("classes must be a list of class names", path=path, field=f"tasks.{name}.classes")
        tasks.append(TaskSpec(name, kind, tuple(str(c) for c in classes), str(spec.get("description", ""))))
    return sources, tasks, _mapping(obj.get("meta", {}), path, "meta")


def _schema_name(name: Any, what: str, path: str | Path, field: str) -> None:
    problem = check_name(name, what)
    if problem:
        raise DataError(problem, path=path, field=field, expected=f"a non-empty {what} without control characters")


def _mapping(value: Any, path: str | Path, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError("expected a JSON object", path=path, field=field)
    return value


# ---- folder format --------------------------------------------------------------------------------
def save_dataset(ds: UserDataset, folder: str | Path) -> Path:
    """Write ``ds`` as a folder (built in a temp folder, then renamed: never half-written).

    Args:
        ds: the data set.
        folder: the folder to write; a data set folder already there is replaced.

    Raises:
        DataError: a file is in the way, the folder exists but is not a data set folder, or it cannot be written.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise DataError("cannot write a data set folder here: a file is in the way", path=target,
                        expected="a new folder or a data set folder to replace")
    if target.is_dir() and any(target.iterdir()) and not (target / "dataset.json").exists():
        raise DataError("not a data set folder (no dataset.json): refusing to replace it", path=target,
                        expected="a new folder or a data set folder to replace")
    created = ensure_folder(target.parent)
    try:
        _write_dataset_folder(ds, target)
    except BaseException:
        remove_empty_folders(created)
        raise
    return target


def _write_dataset_folder(ds: UserDataset, target: Path) -> None:
    try:
        staging_root = tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.")
    except OSError as err:
        raise DataError(f"cannot write here: {err.strerror}", path=target, expected="a writable location") from None
    with staging_root as tmp:
        staging = Path(tmp) / "data"
        (staging / "sources").mkdir(parents=True)
        for name, frame in ds.sources.items():
            frame.to_parquet(staging / "sources" / f"{name}.parquet", index=False)
        if ds.future:
            (staging / "future").mkdir()
            for name, frame in ds.future.items():
                frame.to_parquet(staging / "future" / f"{name}.parquet", index=False)
        if ds.profile is not None:
            ds.profile.to_parquet(staging / "profile.parquet")
        _labels_for_storage(ds.labels).to_parquet(staging / "labels.parquet")
        write_json(staging / "dataset.json", {**schema_to_json(ds), "user_ids": list(ds.user_ids)})
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def _labels_for_storage(labels: pd.DataFrame) -> pd.DataFrame:
    # Parquet needs one type per column: keep numbers numeric, store everything else as strings.
    out = labels.copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].map(lambda v: None if pd.isna(v) else str(v))
    return out


def load_dataset_folder(folder: str | Path) -> UserDataset:
    """Read a data set folder written by ``save_dataset`` (or by hand in that layout).

    Args:
        folder: a folder written by ``save_dataset``.

    Raises:
        DataError: a file is missing or malformed (naming the file and what is wrong).
    """
    root = Path(folder)
    meta_path = root / "dataset.json"
    obj = read_json(meta_path)
    specs, tasks, meta = schema_from_json(obj, path=meta_path)
    sources: dict[str, pd.DataFrame] = {}
    for spec in specs:
        path = root / "sources" / f"{spec.name}.parquet"
        if path.exists():
            sources[spec.name] = _read_parquet(path, ("user_id", "timestamp", *spec.fields))
    if (root / "sources").exists():
        for path in sorted((root / "sources").glob("*.parquet")):
            if path.stem not in {s.name for s in specs}:
                raise DataError(f"unknown source '{path.stem}'", path=path, field="sources",
                                expected=f"one of {[s.name for s in specs]} (declared in {meta_path})")
    future = {}
    for spec in specs:
        path = root / "future" / f"{spec.name}.parquet"
        if path.exists():
            future[spec.name] = _read_parquet(path, ("user_id", "timestamp", *spec.fields))
    labels = _read_parquet(root / "labels.parquet", tuple(t.name for t in tasks), index=True)
    profile = _read_parquet(root / "profile.parquet", (), index=True) if (root / "profile.parquet").exists() else None
    user_ids = obj.get("user_ids")
    ds = UserDataset.build(
        obj.get("name", root.name), sources=sources, source_specs=specs, labels=labels, tasks=tasks,
        profile=profile, user_ids=user_ids, meta=meta, future=future, origin=str(root),
    )
    return ds


def _read_parquet(path: Path, required: tuple[str, ...], *, index: bool = False) -> pd.DataFrame:
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        frame = pd.read_parquet(path)
    except Exception as err:
        raise DataError(f"unreadable Parquet file: {err}", path=path) from None
    if index and frame.index.name != "user_id":
        if "user_id" not in frame.columns:
            raise DataError("missing column 'user_id'", path=path, field="user_id")
        frame = frame.set_index("user_id")
    for col in required:
        if col not in frame.columns:
            raise DataError(f"missing column '{col}'", path=path, field=col, expected=f"columns {list(required)}")
    return frame


# ---- JSONL format ---------------------------------------------------------------------------------
def save_jsonl(ds: UserDataset, path: str | Path) -> Path:
    """Write ``ds`` as JSONL (one user per line) plus a ``.schema.json`` sidecar, atomically.

    Args:
        ds: the data set.
        path: the ``.jsonl`` file to write; the schema goes beside it.
    """
    target = Path(path)
    grouped = {name: ds.events_by_user(name) for name in ds.sources}
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as out:
        for uid in ds.user_ids:
            record: dict[str, Any] = {"user_id": str(uid), "sources": {}}
            for name, by_user in grouped.items():
                spec = ds.source_specs[name]
                events = by_user.get(str(uid))
                if events is not None:
                    record["sources"][name] = [
                        {k: _plain(v) for k, v in row.items()}
                        for row in events[["timestamp", *spec.fields]].to_dict("records")
                    ]
            if ds.profile is not None:
                record["profile"] = {k: None if pd.isna(v) else _plain(v) for k, v in ds.profile.loc[uid].items()}
            record["labels"] = {k: _plain(v) for k, v in ds.labels.loc[uid].items() if pd.notna(v)}
            out.write(json.dumps(record) + "\n")
    write_json(_sidecar(target), schema_to_json(ds))
    return target


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".schema.json") if path.suffix != ".jsonl" else path.with_suffix(".schema.json")


def load_jsonl(path: str | Path, *, schema: Mapping[str, Any] | None = None) -> UserDataset:
    """Read a JSONL user file; every malformed record names the file, the line and the field.

    Args:
        path: the ``.jsonl`` file.
        schema: the schema (sources, tasks); default: the ``.schema.json`` beside the file.

    Raises:
        DataError: the file, its schema or a record is malformed.
    """
    source_path = Path(path)
    if not source_path.exists():
        raise DataError("file not found", path=source_path)
    declared, schema_path = schema, source_path
    if declared is None and _sidecar(source_path).exists():
        schema_path = _sidecar(source_path)
        declared = read_json(schema_path)
    parser = _JsonlParser(source_path, declared, schema_path=schema_path)
    for line_no, record in _records(source_path):
        parser.add(line_no, record)
    return parser.finish()


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})",
                                path=path, line=line_no, expected="a UTF-8 encoded file") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"malformed JSON: {err.msg} at column {err.colno}", path=path, line=line_no) from None
            if not isinstance(record, dict):
                raise DataError("each line must be a JSON object (one user)", path=path, line=line_no)
            yield line_no, record


#: Timestamps are seconds since the epoch within years 1..9999 (what dates and pandas can represent).
_TIME_RANGE = (-62135596800, 253402300799)
_RESERVED_FIELDS = ("user_id", "timestamp")


def check_name(name: Any, what: str) -> str | None:
    """Why ``name`` cannot name a user, source, field, profile column or task (None if it can)."""
    if not isinstance(name, str):
        return f"{what} {name!r} is not a string"
    if not name.strip():
        return f"empty {what} {name!r}"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return f"{what} {name!r} contains a control character"
    return None


class _JsonlParser:
    """Accumulates validated records; field kinds come from the schema or their first occurrence."""

    def __init__(self, path: Path, schema: Any, *, schema_path: Path | None = None) -> None:
        self.path = path
        self.declared = schema is not None
        specs, tasks, meta = schema_from_json(schema, path=schema_path or path) if schema is not None else ([], [], {})
        self.specs = {s.name: s for s in specs}
        self.tasks = {t.name: t for t in tasks}
        self.meta = meta
        self.field_kind: dict[str, str] = {}  # "source.field" or "profile.x" or "labels.x" -> "number"/"text"
        for s in specs:
            if s.text_field:
                self.field_kind[f"{s.name}.{s.text_field}"] = "text"
            for f in s.numeric_fields:
                self.field_kind[f"{s.name}.{f}"] = "number"
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.profile: dict[str, dict[str, float | str]] = {}
        self.labels: dict[str, dict[str, Any]] = {}
        self.user_ids: list[str] = []
        self.seen: dict[str, int] = {}

    def fail(self, message: str, line: int, field: str | None, expected: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=line, field=field, expected=expected)

    def add(self, line: int, record: dict[str, Any]) -> None:
        uid = record.get("user_id")
        if uid is None:
            raise self.fail("missing user id", line, "user_id")
        if not isinstance(uid, str | int) or isinstance(uid, bool):
            raise self.fail(f"user id {uid!r}", line, "user_id", "a string or an integer")
        uid = str(uid)
        problem = check_name(uid, "user id")
        if problem:
            raise self.fail(problem, line, "user_id", "a non-empty id without control characters")
        if uid in self.seen:
            raise self.fail(f"duplicate user '{uid}' (first on line {self.seen[uid]})", line, "user_id")
        self.seen[uid] = line
        self.user_ids.append(uid)
        unknown = set(record) - {"user_id", "sources", "profile", "labels"}
        if unknown:
            raise self.fail(f"unknown key(s) {sorted(unknown)}", line, sorted(unknown)[0],
                            "user_id, sources, profile, labels")
        sources = record.get("sources", {})
        if not isinstance(sources, dict):
            raise self.fail("sources must be an object of source name -> list of events", line, "sources")
        for name, events in sources.items():
            self._name(name, "source name", line, "sources")
            self._add_events(line, uid, name, events)
        profile = record.get("profile", {})
        if not isinstance(profile, dict):
            raise self.fail("profile must be an object of numbers or texts", line, "profile")
        row = self.profile.setdefault(uid, {}) if "profile" in record else None
        for key, value in profile.items():
            self._name(key, "profile key", line, "profile")
            if row is not None:  # null: a value the user's data does not have (the key is still there)
                row[key] = np.nan if value is None else self._profile_value(key, value, line)
        labels = record.get("labels", {})
        if not isinstance(labels, dict):
            raise self.fail("labels must be an object of task -> label", line, "labels")
        for key, value in labels.items():
            self._name(key, "task name", line, "labels")
            if value is None:
                continue  # an unlabelled user for this task
            self._check_label(key, value, line)
            self.labels.setdefault(uid, {})[key] = value

    def _name(self, name: Any, what: str, line: int, field: str) -> None:
        problem = check_name(name, what)
        if problem is None and what != "source name" and name in _RESERVED_FIELDS:
            problem = f"{what} {name!r} is reserved"
        if problem:
            raise self.fail(problem, line, field, f"a non-empty {what} without control characters")

    def _add_events(self, line: int, uid: str, name: str, events: Any) -> None:
        if self.declared and name not in self.specs:
            raise self.fail(f"unknown source '{name}'", line, f"sources.{name}", f"one of {sorted(self.specs)}")
        if not isinstance(events, list):
            raise self.fail("a source must be a list of events", line, f"sources.{name}")
        rows = self.events.setdefault(name, [])
        for i, event in enumerate(events):
            where = f"sources.{name}[{i}]"
            if not isinstance(event, dict):
                raise self.fail("an event must be an object", line, where)
            if "timestamp" not in event:
                raise self.fail("missing timestamp", line, f"{where}.timestamp")
            row = {"user_id": uid, "timestamp": self._timestamp(event["timestamp"], line, f"{where}.timestamp")}
            for key, value in event.items():
                if key == "timestamp":
                    continue
                self._name(key, "field name", line, where)
                kind = self.field_kind.get(f"{name}.{key}")
                if kind is None:
                    if self.declared:
                        raise self.fail(f"unknown field '{key}' in source '{name}'", line, f"{where}.{key}",
                                        "a field declared in the schema")
                    kind = "text" if isinstance(value, str) else "number"
                    self.field_kind[f"{name}.{key}"] = kind
                if kind == "text":
                    if not isinstance(value, str):
                        raise self.fail(f"value {value!r}", line, f"{where}.{key}", "a string")
                    row[key] = value
                else:
                    row[key] = self._number(value, line, f"{where}.{key}")
            rows.append(row)

    def _profile_value(self, key: str, value: Any, line: int) -> float | str:
        """A profile value: a number, or a text (a category such as an institution's name); one kind per key."""
        field = f"profile.{key}"
        kind = "text" if isinstance(value, str) else "number"
        previous = self.field_kind.setdefault(field, kind)
        if previous != kind:
            raise self.fail(f"value {value!r}", line, field, "a text (this key holds texts)" if previous == "text"
                            else "a number (this key holds numbers)")
        return value if isinstance(value, str) else self._number(value, line, field)

    def _number(self, value: Any, line: int, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise self.fail(f"value {value!r}", line, field, "a finite number")
        return float(value)

    def _timestamp(self, value: Any, line: int, field: str) -> int:
        expected = "seconds since the epoch or an ISO 8601 date such as 2024-05-01T12:00:00"
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            try:  # ISO 8601 only: words pandas would accept ('now', 'tomorrow') are not times in a data file
                stamp = datetime.fromisoformat(value.strip())
            except ValueError:
                raise self.fail(f"timestamp {value!r} is not a date", line, field, expected) from None
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=UTC)  # a date without a zone is read as UTC
            seconds = stamp.timestamp()
        if seconds is None:
            raise self.fail(f"timestamp {value!r}", line, field, expected)
        if not np.isfinite(seconds):
            raise self.fail(f"timestamp {value!r} is not a finite number", line, field, expected)
        if not _TIME_RANGE[0] <= seconds <= _TIME_RANGE[1]:
            raise self.fail(f"timestamp {value!r} is out of range", line, field, expected + " (years 1 to 9999)")
        return int(seconds)

    def _check_label(self, key: str, value: Any, line: int) -> None:
        field = f"labels.{key}"
        if self.declared and key not in self.tasks:
            raise self.fail(f"unknown task '{key}'", line, field, f"one of {sorted(self.tasks)}")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.fail(f"label {value!r}", line, field, "a number or a class name")
        if isinstance(value, float) and not np.isfinite(value):
            raise self.fail(f"label {value!r}", line, field, "a finite number, a class name or null")
        kind = "text" if isinstance(value, str) else "number"
        previous = self.field_kind.setdefault(f"labels.{key}", kind)
        if previous != kind:
            raise self.fail(f"label {value!r}", line, field, "a class name" if previous == "text" else "a number")

    def _check_profile_keys(self) -> None:
        """Every user has the same profile keys: a key some users lack is a typo or a broken export, not a
        missing value (write null for that)."""
        keys = list(dict.fromkeys(k for row in self.profile.values() for k in row))
        expected = "the same profile keys for every user (null where a value is missing)"
        for key in keys:
            having = [u for u in self.user_ids if key in self.profile.get(u, {})]
            if len(having) == len(self.user_ids):
                continue
            if len(having) * 2 < len(self.user_ids):  # a rare key: point at a user who has it
                raise self.fail(f"profile key '{key}' appears for {len(having)} of {len(self.user_ids)} users",
                                self.seen[having[0]], f"profile.{key}", expected)
            lacking = next(u for u in self.user_ids if key not in self.profile.get(u, {}))
            raise self.fail(f"profile key '{key}' is missing (the other users have it)", self.seen[lacking],
                            f"profile.{key}", expected)

    def finish(self) -> UserDataset:
        if not self.user_ids:
            raise DataError("no users in file", path=self.path)
        specs = dict(self.specs)
        for name in self.events:
            if name not in specs:
                text = [k.split(".", 1)[1] for k, v in self.field_kind.items() if k.startswith(f"{name}.") and v == "text"]
                nums = [k.split(".", 1)[1] for k, v in self.field_kind.items() if k.startswith(f"{name}.") and v == "number"]
                if len(text) > 1:
                    raise DataError(f"source '{name}' has several text fields {text}; declare one in a schema",
                                    path=self.path, field=f"sources.{name}")
                specs[name] = SourceSpec(name, text[0] if text else None, tuple(nums))
        sources = {}
        for name, rows in self.events.items():
            frame = pd.DataFrame(rows)
            for col in specs[name].fields:
                if col not in frame.columns:
                    raise DataError(f"no event of source '{name}' has field '{col}'", path=self.path,
                                    field=f"sources.{name}.{col}")
                missing = frame[col].isna().to_numpy()
                if missing.any():
                    uid = frame["user_id"].iloc[int(np.flatnonzero(missing)[0])]
                    raise DataError(f"an event lacks field '{col}'", path=self.path, line=self.seen[uid],
                                    field=f"sources.{name}[].{col}")
            sources[name] = frame
        tasks = dict(self.tasks)
        label_frame = pd.DataFrame.from_dict(self.labels, orient="index")
        for key in label_frame.columns:
            if key not in tasks:
                values = label_frame[key].dropna()
                if self.field_kind.get(f"labels.{key}") == "text":
                    tasks[key] = TaskSpec(key, "binary" if values.nunique() == 2 else "multiclass",
                                          tuple(sorted(values.astype(str).unique())))
                elif set(values.unique()) <= {0, 1}:
                    tasks[key] = TaskSpec(key, "binary")
                else:
                    tasks[key] = TaskSpec(key, "regression")
        self._check_profile_keys()
        profile = pd.DataFrame.from_dict(self.profile, orient="index") if self.profile else None
        declared_name = self.meta.get("name")
        return UserDataset.build(
            declared_name if isinstance(declared_name, str) else self.path.stem,
            sources=sources, source_specs=specs.values(), labels=label_frame, tasks=tasks.values(),
            profile=profile, user_ids=self.user_ids, meta=self.meta, origin=str(self.path),
        )


# ---- dispatch -------------------------------------------------------------------------------------
_SYNTHETIC_SPEC = re.compile(r"synthetic(?::(\d+))?")
_SYNTHETIC_MAX_USERS = 1_000_000


def synthetic_size(spec: str) -> int | None:
    """The number of users a ``synthetic`` / ``synthetic:N`` spec asks for; None if ``spec`` is not such a spec.

    Only the exact spec picks the generator: ``synthetic_users.jsonl`` is the user's file. A spec that starts
    like one but is malformed (``synthetic:abc``, ``synthetic:0``) raises ConfigError, unless it names an
    existing file or folder."""
    match = _SYNTHETIC_SPEC.fullmatch(spec)
    if match is None:
        if spec.startswith("synthetic:") and not Path(spec).exists():
            raise ConfigError(f"data {spec!r}: expected synthetic or synthetic:N with N a whole number of users "
                              f"from 1 to {_SYNTHETIC_MAX_USERS:,}")
        return None
    n = int(match.group(1)) if match.group(1) is not None else 300
    if not 1 <= n <= _SYNTHETIC_MAX_USERS:
        raise ConfigError(f"data {spec!r}: N must be a whole number of users from 1 to {_SYNTHETIC_MAX_USERS:,}")
    return n


def load_user_data(path: str | Path) -> UserDataset:
    """Load a data set from a folder, a .jsonl file, or a known name (movielens-100k, synthetic[:N]).

    Args:
        path: a data set folder, a ``.jsonl`` file, ``movielens-100k`` or ``synthetic[:N]``.

    Raises:
        DataError: nothing is at ``path`` or it cannot be read as a data set.
    """
    text = str(path)
    if text == "movielens-100k":
        from pluribus.data.movielens import load_movielens

        return load_movielens()
    n_synthetic = synthetic_size(text) if isinstance(path, str) else None
    if n_synthetic is not None:
        from pluribus.data.synthetic import make_synthetic_users

        return make_synthetic_users(n_synthetic)
    p = Path(path)
    if p.is_dir():
        if (p / "dataset.json").exists():
            return load_dataset_folder(p)
        from pluribus.data.movielens import is_movielens_folder, load_movielens

        if not is_movielens_folder(p):
            raise DataError("not a data set folder: no dataset.json (nor MovieLens-100K files)", path=p,
                            expected=DATA_CHOICES)

        return load_movielens(p)
    if p.suffix == ".jsonl":
        return load_jsonl(p)
    if not p.exists():
        if p.suffix == "" and len(p.parts) == 1:  # a bare word: most likely a data set name
            raise DataError(f"unknown data set {text!r} (and no such file or folder)", expected=DATA_CHOICES)
        raise DataError("no such file or folder", path=p, expected=DATA_CHOICES)
    raise DataError("unknown data format", path=p, expected="a data set folder or a .jsonl file")
