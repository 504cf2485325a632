"""Simple per-user features and label checks shared by the baselines, the demo and the federated CLIs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pluribus.data.schema import UserDataset
from pluribus.errors import ConfigError

if TYPE_CHECKING:
    import torch


def simple_features(ds: UserDataset) -> np.ndarray:
    """The simple baseline's features: the profile's numeric columns, or per-source event counts without any."""
    profile = ds.numeric_profile()
    if profile is not None:
        return profile.fillna(0.0).to_numpy(dtype=np.float64)
    counts = [ds.source(s).groupby("user_id").size().reindex(ds.user_ids, fill_value=0) for s in ds.source_names]
    return np.log1p(np.stack([c.to_numpy(dtype=np.float64) for c in counts], axis=1))


def user_feature_tokens(ds: UserDataset) -> torch.Tensor:
    """Per-user input tokens [U, 1, F]: ``simple_features``, each column standardised over the users."""
    import torch

    x = simple_features(ds)
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)  # a constant column stays 0 instead of dividing by 0
    return torch.from_numpy(x.astype(np.float32))[:, None, :]


def check_class_labels(ds: UserDataset, data: str, names: list[str], *, option: str, needed_by: str) -> None:
    """ConfigError naming ``option`` unless every name is a binary or multiclass label of ``ds``."""
    for name in names:
        if name not in ds.tasks:
            raise ConfigError(f"{option}: {data} has no label {name!r}; its labels: {', '.join(sorted(ds.tasks)) or 'none'}")
        if ds.tasks[name].kind not in ("binary", "multiclass"):
            raise ConfigError(f"{option}: label {name!r} is {ds.tasks[name].kind}; {needed_by} need binary or "
                              "multiclass labels")
