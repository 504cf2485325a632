"""Deterministic train/validation/test splits by user and by time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pluribus.data.schema import UserDataset
from pluribus.errors import ConfigError


def split_indices(n_items: int, fractions: Sequence[float] = (0.8, 0.2), *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Shuffle ``range(n_items)`` by ``seed`` and cut it by ``fractions`` (which must sum to 1).

    Args:
        n_items: how many items to split.
        fractions: the parts' shares, summing to 1.
        seed: the shuffle's seed.

    Raises:
        ConfigError: a fraction is not positive or the fractions do not sum to 1.
    """
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"fractions={list(fractions)}: need positive values that sum to 1")
    order = np.random.default_rng(seed).permutation(n_items)
    cuts = np.round(np.cumsum(fractions)[:-1] * n_items).astype(int)
    return tuple(np.sort(part) for part in np.split(order, cuts))


_PART_NAMES = {2: ("train", "test"), 3: ("train", "validation", "test")}


def split_users(
    ds: UserDataset, fractions: Sequence[float] = (0.8, 0.2), *, seed: int = 0
) -> tuple[UserDataset, ...]:
    """Split a data set by user: every user's events land in exactly one part.

    Args:
        ds: the data set.
        fractions: the parts' shares of the users, summing to 1.
        seed: the shuffle's seed.
    """
    parts = split_indices(ds.n_users, fractions, seed=seed)
    names = _PART_NAMES.get(len(parts), tuple(f"part{i}" for i in range(len(parts))))
    return tuple(ds.subset(ds.user_ids[idx], name=f"{ds.name}:{n}") for idx, n in zip(parts, names, strict=True))


def split_by_time(ds: UserDataset, *, cutoff: int) -> tuple[UserDataset, UserDataset]:
    """Split every source at a global timestamp: events before ``cutoff`` vs from ``cutoff`` on.

    Args:
        ds: the data set.
        cutoff: the timestamp (seconds) where the second part starts.
    """

    def part(keep_before: bool) -> UserDataset:
        def cut(frame: pd.DataFrame) -> pd.DataFrame:
            mask = frame["timestamp"] < cutoff
            return frame[mask if keep_before else ~mask].reset_index(drop=True)

        return UserDataset(
            f"{ds.name}:{'before' if keep_before else 'after'}", ds.user_ids.copy(),
            {k: cut(v) for k, v in ds.sources.items()}, dict(ds.source_specs), ds.labels, dict(ds.tasks),
            ds.profile, dict(ds.meta), {k: cut(v) for k, v in ds.future.items()},
        )

    return part(True), part(False)
