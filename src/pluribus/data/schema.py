"""The multi-source user data set: sources of time-stamped events, a tabular profile and labels.

In memory everything is columnar (pandas):

- ``sources[name]``: one row per event, columns ``user_id`` (str), ``timestamp`` (int64 seconds),
  then the source's text field and/or numeric fields (declared in ``SourceSpec``);
- ``profile``: one row per user (index ``user_id``), numeric columns; optional;
- ``labels``: one row per user (index ``user_id``), one column per task (``TaskSpec``); missing
  labels are NaN / None.

On disk a data set is a folder (``dataset.json`` + Parquet files, see ``store.py``) or a JSONL file
with one user per line (see ``jsonl.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from pluribus.errors import DataError

TaskKind = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class SourceSpec:
    """One behaviour source: its name, its text field (or None) and its numeric fields.

    Attributes:
        name: the source's name (the key of ``UserDataset.sources``).
        text_field: the column holding each event's text, or None for a source without text.
        numeric_fields: the columns holding each event's numbers.
        description: free text shown in reports.
    """

    name: str
    text_field: str | None = "text"
    numeric_fields: tuple[str, ...] = ()
    description: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        """Event fields besides user_id and timestamp."""
        return ((self.text_field,) if self.text_field else ()) + self.numeric_fields


@dataclass(frozen=True)
class TaskSpec:
    """One downstream label: binary, multiclass (with its classes) or regression.

    Attributes:
        name: the label's column in ``UserDataset.labels``.
        kind: ``binary``, ``multiclass`` or ``regression``.
        classes: the class values in order (multiclass; binary uses 0 and 1).
        description: free text shown in reports.
    """

    name: str
    kind: TaskKind = "binary"
    classes: tuple[str, ...] = ()
    description: str = ""


@dataclass
class UserDataset:
    """Users with several behaviour sources, an optional profile and labels (see module docstring).

    Build one with :meth:`UserDataset.build`, which validates it; the constructor takes the parts as they are.

    Attributes:
        name: the data set's name (shown in reports and errors).
        user_ids: every user, in a fixed order (rows of labels, profile and any per-user array).
        sources: source name -> events (``user_id``, ``timestamp`` in seconds and the spec's fields).
        source_specs: source name -> its :class:`SourceSpec`.
        labels: one row per user (index ``user_id``), one column per task; missing labels are NaN.
        tasks: task name -> its :class:`TaskSpec`.
        profile: optional per-user columns (numbers, or texts such as an institution's name).
        meta: free JSON-able facts about the data set (origin, licence, counts).
        future: optional held-out later events per source (for next-item evaluation).
    """

    name: str
    user_ids: np.ndarray
    sources: dict[str, pd.DataFrame]
    source_specs: dict[str, SourceSpec]
    labels: pd.DataFrame
    tasks: dict[str, TaskSpec]
    profile: pd.DataFrame | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Held-out future events per source (same columns as ``sources``): for labels and contrastive
    # positives only, never model input.
    future: dict[str, pd.DataFrame] = field(default_factory=dict)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        name: str,
        *,
        sources: Mapping[str, pd.DataFrame],
        source_specs: Iterable[SourceSpec],
        labels: pd.DataFrame | None = None,
        tasks: Iterable[TaskSpec] = (),
        profile: pd.DataFrame | None = None,
        user_ids: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        future: Mapping[str, pd.DataFrame] | None = None,
        origin: str | None = None,
    ) -> UserDataset:
        """Assemble and validate a data set (errors name ``origin``); user ids default to every user seen.

        Args:
            name: the data set's name.
            sources: source name -> events (``user_id``, ``timestamp`` and the spec's fields).
            source_specs: one spec per source.
            labels: one row per user (index ``user_id``), one column per task, or None.
            tasks: one spec per label column.
            profile: per-user columns (index ``user_id``), or None.
            user_ids: the users in order; default: every user seen in sources, labels and profile.
            meta: free facts about the data set.
            future: held-out later events per source, or None.
            origin: where the data came from (a path), named in errors.

        Raises:
            DataError: the parts do not fit their specs (see :meth:`validate`).
        """
        specs = {s.name: s for s in source_specs}
        srcs = {k: _normalise_events(k, v, origin=origin or name) for k, v in sources.items()}
        if user_ids is None:
            seen: set[str] = set()
            for frame in srcs.values():
                seen.update(frame["user_id"].unique())
            if profile is not None:
                seen.update(profile.index.astype(str))
            if labels is not None:
                seen.update(labels.index.astype(str))
            ids = np.array(sorted(seen), dtype=object)
        else:
            ids = np.array([str(u) for u in user_ids], dtype=object)
        task_map = {t.name: t for t in tasks}
        lab = labels if labels is not None else pd.DataFrame(index=pd.Index([], name="user_id"))
        lab = lab.copy()
        lab.index = lab.index.astype(str)
        lab.index.name = "user_id"
        lab = lab.reindex(ids)
        prof = None
        if profile is not None:
            prof = profile.copy()
            prof.index = prof.index.astype(str)
            prof.index.name = "user_id"
            prof = prof.reindex(ids)
        fut = {k: _normalise_events(k, v, origin=origin or name) for k, v in (future or {}).items()}
        ds = cls(name, ids, srcs, specs, lab, task_map, prof, dict(meta or {}), fut)
        ds.validate(origin=origin)
        return ds

    # ---- checks -----------------------------------------------------------------------------
    def validate(self, *, origin: str | None = None) -> None:
        """Check sources against their specs and labels against their tasks; raise DataError if not.

        Args:
            origin: where the data came from, named in the error.

        Raises:
            DataError: a source lacks a column of its spec or holds values of the wrong kind, or a task's label
                column is missing or does not fit the task.
        """
        where = origin or self.name
        for name, frame in self.sources.items():
            if name not in self.source_specs:
                raise DataError(
                    f"unknown source '{name}'", path=where, field=f"sources.{name}",
                    expected=f"one of {sorted(self.source_specs)}",
                )
            spec = self.source_specs[name]
            for col in ("user_id", "timestamp", *spec.fields):
                if col not in frame.columns:
                    raise DataError(f"missing column '{col}' in source '{name}'", path=where, field=f"{name}.{col}")
            for col in spec.numeric_fields:
                if not pd.api.types.is_numeric_dtype(frame[col]):
                    bad = _first_non_numeric(frame[col])
                    raise DataError(
                        f"non-numeric value {_shown(frame[col].iloc[bad])!r} in source '{name}'",
                        path=where, row=bad, field=f"{name}.{col}", expected="a number",
                    )
                _check_finite(frame[col], where=where, field=f"{name}.{col}", allow_missing=False)
        for task in self.tasks.values():
            if task.name not in self.labels.columns:
                raise DataError(f"no label column for task '{task.name}'", path=where, field=f"labels.{task.name}")
            check_label_column(self.labels[task.name], task, origin=where)
        if self.profile is not None:
            for col in self.profile.columns:
                column = self.profile[col]
                if pd.api.types.is_numeric_dtype(column):
                    _check_finite(column, where=where, field=f"profile.{col}", allow_missing=True)
                    continue
                is_text = column.map(lambda v: isinstance(v, str) or v is None or (isinstance(v, float) and np.isnan(v)))
                if not bool(is_text.all()):  # a text column (a category, e.g. an institution) is fine; a mix is not
                    bad = int(np.flatnonzero(~is_text.to_numpy())[0])
                    raise DataError(
                        f"profile value {_shown(column.iloc[bad])!r} in a column of texts",
                        path=where, row=bad, field=f"profile.{col}", expected="one kind per column: numbers or texts",
                    )

    def require(self, *, needed_by: str, sources: bool = False, classification: bool = False,
                origin: str | None = None) -> None:
        """Refuse, naming ``needed_by``, a data set without behaviour events (``sources``) or without a
        classification task (``classification``) when the step needs them; call before writing anything.

        Args:
            needed_by: the step that needs them (named in the error).
            sources: whether the step needs behaviour events.
            classification: whether the step needs a binary or multiclass task.
            origin: where the data came from, named in the error.

        Raises:
            DataError: the data set lacks what the step needs.
        """
        where = origin or self.name
        if classification and not any(t.kind != "regression" for t in self.tasks.values()):
            raise DataError(f"{needed_by} needs at least one classification task (a label with classes); this data "
                            f"set has {len(self.tasks)} task(s), none of them classification",
                            path=where, field="labels", expected="a binary or multiclass label")
        if sources and not any(len(frame) for frame in self.sources.values()):
            raise DataError(f"{needed_by} needs behaviour sources; this data set has no events", path=where,
                            field="sources", expected="at least one source with events")

    # ---- access -----------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    def numeric_profile(self) -> pd.DataFrame | None:
        """The profile's numeric columns (the features models read), or None without any; text columns (such as
        an institution's name) are categories for partitioning and reports, not features."""
        if self.profile is None:
            return None
        numeric = self.profile.select_dtypes("number")
        return numeric if numeric.shape[1] > 0 else None

    @property
    def source_names(self) -> list[str]:
        """Source names in declaration order."""
        return list(self.source_specs)

    def source(self, name: str) -> pd.DataFrame:
        """The events of one source; an unknown name lists the known ones.

        Args:
            name: the source's name.

        Raises:
            DataError: no source has that name.
        """
        if name not in self.source_specs:
            raise DataError(f"unknown source '{name}'", path=self.name, expected=f"one of {self.source_names}")
        spec = self.source_specs[name]
        if name not in self.sources:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in ("user_id", "timestamp", *spec.fields)})
        return self.sources[name]

    def task(self, name: str) -> TaskSpec:
        """One task's spec; an unknown name lists the known ones.

        Args:
            name: the task's name.

        Raises:
            DataError: no task has that name.
        """
        if name not in self.tasks:
            raise DataError(f"unknown task '{name}'", path=self.name, expected=f"one of {sorted(self.tasks)}")
        return self.tasks[name]

    def label_array(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask of users that have the label, encoded labels for those users): class index or value.

        Args:
            task: the task's name.
        """
        spec = self.task(task)
        col = self.labels[task]
        mask = col.notna().to_numpy()
        values = col[mask]
        if spec.kind == "regression":
            return mask, values.astype(float).to_numpy()
        if spec.classes:
            lookup = {c: i for i, c in enumerate(spec.classes)}
            return mask, np.array([lookup[str(v)] for v in values], dtype=np.int64)
        return mask, values.astype(np.int64).to_numpy()

    def events_by_user(self, name: str) -> dict[str, pd.DataFrame]:
        """One source's events grouped per user and sorted by time.

        Args:
            name: the source's name.
        """
        frame = self.source(name).sort_values(["user_id", "timestamp"], kind="stable")
        return {str(u): g for u, g in frame.groupby("user_id", sort=False)}

    def subset(self, user_ids: Iterable[str], *, name: str | None = None) -> UserDataset:
        """A data set restricted to ``user_ids`` (order kept as given).

        Args:
            user_ids: the users to keep, in the order wanted.
            name: the new data set's name (default: this one's).

        Raises:
            DataError: a user id is not in this data set.
        """
        ids = np.array([str(u) for u in user_ids], dtype=object)
        unknown = set(ids) - set(self.user_ids)
        if unknown:
            raise DataError(f"{len(unknown)} unknown user id(s), e.g. {sorted(unknown)[:3]}", path=self.name)
        keep = set(ids)
        def keep_users(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
            return {k: v[v["user_id"].isin(keep)].reset_index(drop=True) for k, v in frames.items()}

        return UserDataset(
            name or self.name, ids, keep_users(self.sources), dict(self.source_specs), self.labels.loc[ids],
            dict(self.tasks), None if self.profile is None else self.profile.loc[ids], dict(self.meta),
            keep_users(self.future),
        )

    def summary(self) -> dict[str, Any]:
        """Counts of users, events per source, profile columns and label balance per task."""
        out: dict[str, Any] = {"name": self.name, "users": self.n_users, "sources": {}, "labels": {}}
        for name in self.source_names:
            frame = self.source(name)
            per_user = frame.groupby("user_id").size().reindex(self.user_ids, fill_value=0)
            out["sources"][name] = {
                "events": len(frame),
                "users_with_events": int((per_user > 0).sum()),
                "events_per_user_median": float(per_user.median()) if len(per_user) else 0.0,
                "fields": list(self.source_specs[name].fields),
            }
        out["profile_columns"] = [] if self.profile is None else list(self.profile.columns)
        for task in self.tasks.values():
            col = self.labels[task.name].dropna()
            entry: dict[str, Any] = {"kind": task.kind, "labelled": len(col)}
            if task.kind == "regression":
                entry.update(mean=float(col.astype(float).mean()), std=float(col.astype(float).std()))
            else:
                counts = col.astype(str).value_counts(normalize=True).sort_index()
                entry["balance"] = {str(k): round(float(v), 4) for k, v in counts.items()}
            out["labels"][task.name] = entry
        out.update({k: v for k, v in self.meta.items() if isinstance(v, int | float | str)})
        return out


def check_label_column(col: pd.Series, task: TaskSpec, *, origin: str) -> None:
    """Labels must fit their task: known classes, numbers for regression, and at least two classes."""
    present = col.dropna()
    if task.kind == "regression":
        values = pd.to_numeric(present, errors="coerce")
        if values.isna().any() or np.isinf(values.to_numpy(dtype=np.float64)).any():
            bad = int(np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan)))[0])
            raise DataError(
                f"label {present.iloc[bad]!r}", path=origin, row=bad,
                field=f"labels.{task.name}", expected="a finite number",
            )
        return
    if task.classes:
        allowed = set(task.classes) | {str(i) for i in range(len(task.classes))}
        bad_mask = ~present.astype(str).isin(allowed)
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask.to_numpy())[0])
            raise DataError(
                f"unknown class {present.iloc[bad]!r}", path=origin, row=bad,
                field=f"labels.{task.name}", expected=f"one of {list(task.classes)}",
            )
    elif task.kind == "binary":
        bad_mask = ~present.astype(str).isin({"0", "1", "0.0", "1.0", "True", "False"})
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask.to_numpy())[0])
            raise DataError(
                f"binary label {present.iloc[bad]!r}", path=origin, row=bad,
                field=f"labels.{task.name}", expected="0 or 1",
            )
    if present.astype(str).nunique() < 2:
        only = present.iloc[0] if len(present) else "nothing"
        only = only.item() if isinstance(only, np.generic) else only
        raise DataError(
            f"task '{task.name}' has one class only ({only!r} for all {len(present)} labelled users)",
            path=origin, field=f"labels.{task.name}", expected="at least two classes",
        )


def _normalise_events(name: str, frame: pd.DataFrame, *, origin: str) -> pd.DataFrame:
    out = frame.copy()
    if "user_id" in out.columns:
        out["user_id"] = out["user_id"].astype(str)
    if "timestamp" in out.columns and not pd.api.types.is_integer_dtype(out["timestamp"]):
        ts = out["timestamp"]
        if pd.api.types.is_datetime64_any_dtype(ts):
            out["timestamp"] = ts.astype("int64") // 10**9
        else:
            numeric = pd.to_numeric(ts, errors="coerce")
            # float64 holds every second of years 1..9999; NaN, inf and anything past that are not times
            bad_mask = ~np.isfinite(numeric.to_numpy(dtype=np.float64, na_value=np.nan)) | (numeric.abs() > 2.6e11)
            if bad_mask.any():
                bad = int(np.flatnonzero(bad_mask.to_numpy())[0])
                raise DataError(
                    f"timestamp {_shown(ts.iloc[bad])!r} in source '{name}'", path=origin, row=bad,
                    field=f"{name}.timestamp", expected="seconds since the epoch (years 1 to 9999)",
                )
            out["timestamp"] = numeric.astype("int64")
    return out.reset_index(drop=True)


def _shown(value: Any) -> Any:
    """A value as the user wrote it (numpy scalars print as plain numbers)."""
    return value.item() if isinstance(value, np.generic) else value


def _check_finite(series: pd.Series, *, where: str, field: str, allow_missing: bool) -> None:
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    bad_mask = np.isinf(values) if allow_missing else ~np.isfinite(values)
    if bad_mask.any():
        bad = int(np.flatnonzero(bad_mask)[0])
        raise DataError(f"value {_shown(series.iloc[bad])!r}", path=where, row=bad, field=field,
                        expected="a finite number" + (" (or missing)" if allow_missing else ""))


def _first_non_numeric(series: pd.Series) -> int:
    coerced = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero((coerced.isna() & series.notna()).to_numpy())
    return int(bad[0]) if len(bad) else 0
