"""Data layer: the multi-source user schema, loaders, generators, partitioners and splits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pluribus.lazy import lazy_getattr

if TYPE_CHECKING:
    from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset
    from pluribus.data.split import split_by_time, split_indices, split_users
    from pluribus.data.store import load_dataset_folder, load_jsonl, load_user_data, save_dataset, save_jsonl

_EXPORTS = {
    "SourceSpec": "schema",
    "TaskSpec": "schema",
    "UserDataset": "schema",
    "split_by_time": "split",
    "split_indices": "split",
    "split_users": "split",
    "load_dataset_folder": "store",
    "load_jsonl": "store",
    "load_user_data": "store",
    "save_dataset": "store",
    "save_jsonl": "store",
}

__getattr__ = lazy_getattr("pluribus.data", _EXPORTS)

__all__ = [
    "SourceSpec",
    "TaskSpec",
    "UserDataset",
    "load_dataset_folder",
    "load_jsonl",
    "load_user_data",
    "save_dataset",
    "save_jsonl",
    "split_by_time",
    "split_indices",
    "split_users",
]
