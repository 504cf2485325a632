"""Data layer: the multi-source user schema, loaders, generators, partitioners and splits."""

from pluribus.data.schema import SourceSpec, TaskSpec, UserDataset
from pluribus.data.split import split_by_time, split_indices, split_users
from pluribus.data.store import load_dataset_folder, load_jsonl, load_user_data, save_dataset, save_jsonl

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
