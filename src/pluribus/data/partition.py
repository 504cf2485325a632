"""Partitioners for federated work: IID, Dirichlet non-IID, by task, by natural id.

IID and Dirichlet splits delegate to ``flwr-datasets`` (the partitioners Flower users know); we only
adapt index arrays in and out, so results match what a Flower pipeline would produce for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pluribus.errors import ConfigError, PluribusError


def _flwr_partition(partitioner: object, labels: np.ndarray) -> list[np.ndarray]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - exercised only without the fl extra
        raise PluribusError("partitioners need flwr-datasets: pip install 'pluribus[fl]'") from err
    table = datasets.Dataset.from_dict({"label": labels, "_index": np.arange(len(labels))})
    partitioner.dataset = table  # type: ignore[attr-defined]
    n = partitioner.num_partitions  # type: ignore[attr-defined]
    return [np.sort(np.asarray(partitioner.load_partition(i)["_index"], dtype=np.int64)) for i in range(n)]  # type: ignore[attr-defined]


def _check_count(n_items: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ConfigError(f"num_partitions={num_partitions}: need at least one partition")
    if num_partitions > n_items:
        raise ConfigError(f"num_partitions={num_partitions} exceeds the {n_items} items to split")


def iid_partition(n_items: int, num_partitions: int, *, seed: int = 0) -> list[np.ndarray]:
    """Split ``range(n_items)`` into ``num_partitions`` shuffled, near-equal index arrays."""
    from flwr_datasets.partitioner import IidPartitioner

    _check_count(n_items, num_partitions)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_items)  # IidPartitioner splits contiguously; shuffling first makes it IID
    parts = _flwr_partition(IidPartitioner(num_partitions=num_partitions), np.zeros(n_items, dtype=np.int64))
    return [np.sort(order[p]) for p in parts]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed split: each class spread over partitions by Dirichlet(``alpha``) proportions."""
    from flwr_datasets.partitioner import DirichletPartitioner

    y = np.asarray(labels)
    _check_count(len(y), num_partitions)
    if alpha <= 0:
        raise ConfigError(f"alpha={alpha}: the Dirichlet concentration must be > 0")
    if min_partition_size * num_partitions > len(y):
        raise ConfigError(
            f"min_partition_size={min_partition_size} x {num_partitions} partitions exceeds the {len(y)} items"
        )
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=alpha,
        min_partition_size=min_partition_size, self_balancing=False, seed=seed,
    )
    return _flwr_partition(partitioner, y)


def natural_id_partition(ids: Sequence[str] | np.ndarray) -> dict[str, np.ndarray]:
    """One partition per distinct id (e.g. an institution column): id -> sorted row indices."""
    values = np.asarray(ids).astype(str)
    return {key: np.flatnonzero(values == key) for key in sorted(set(values))}


def task_partition(
    n_items: int, tasks: Sequence[str], *, clients_per_task: int = 1, seed: int = 0
) -> list[tuple[str, np.ndarray]]:
    """Disjoint IID shards, one client per (task, replica): [(task, indices)], for heterogeneous multi-task FL."""
    if not tasks:
        raise ConfigError("task_partition needs at least one task")
    if clients_per_task < 1:
        raise ConfigError(f"clients_per_task={clients_per_task}: need at least one client per task")
    shards = iid_partition(n_items, len(tasks) * clients_per_task, seed=seed)
    return [(tasks[i // clients_per_task], shard) for i, shard in enumerate(shards)]
