"""Perturbation filter adapter: residual bottlenecks after fused layers, trained with the fused model frozen.

Each adapted layer output ``h`` (d features or channels) becomes ``h + B relu(A h)`` with ``A: d -> r``,
``B: r -> d`` and ``B`` initialised to zero, so the adapted model starts exactly equal to the fused one.
Adapters sit after every hidden Linear layer and after the output layer of an MLP; after ``bn3``, ``fc1``
and ``fc2`` of the SmallCNN (1x1 convolutions on channels). Only adapter weights train.

Privacy: training on a public or fuser-held calibration set costs nothing (post-processing of released
tensors). If the calibration set is private, ``AdapterConfig.private`` trains with DP-SGD (Opacus) and the
returned ledger entry must be added to the data holder's ledger (``privfusion`` adds it to every party's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pluribus.errors import ConfigError, ShapeError
from pluribus.fusion.core.config import AdapterConfig
from pluribus.fusion.core.models import MLP, SmallCNN, check_inputs, recalibrate_batchnorm
from pluribus.fusion.privacy.accounting import Release
from pluribus.fusion.privacy.ldp import check_finite


class Bottleneck(nn.Module):
    """``h + B relu(A h)`` over the feature dim (dim 1); 1x1 convolutions for 4-D inputs."""

    def __init__(self, dim: int, rank: int, *, conv: bool = False) -> None:
        super().__init__()
        if conv:
            self.down: nn.Module = nn.Conv2d(dim, rank, 1)
            self.up: nn.Module = nn.Conv2d(rank, dim, 1)
        else:
            self.down = nn.Linear(dim, rank)
            self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)  # type: ignore[arg-type]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Residual correction of ``h``."""
        return h + self.up(F.relu(self.down(h)))


def adapter_sites(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Module name -> (width, is_conv) of every layer an adapter follows."""
    if isinstance(model, MLP):
        widths = (*model.hidden, model.num_classes)
        return {f"layers.{i}": (w, False) for i, w in enumerate(widths)}
    if isinstance(model, SmallCNN):
        return {"bn3": (model.channels[1], True), "fc1": (model.hidden, False), "fc2": (model.num_classes, False)}
    raise ConfigError(f"no adapter sites for {type(model).__name__}")


class AdaptedModel(nn.Module):
    """A frozen fused model with residual bottleneck adapters attached by forward hooks.

    Args:
        base: the fused model (frozen here).
        rank: the adapters' bottleneck width (0: an eighth of each site's width, at least 4).

    Raises:
        ConfigError: the model has no layer an adapter can attach to.
    """

    def __init__(self, base: nn.Module, *, rank: int = 0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        modules = dict(base.named_modules())
        for name, (dim, conv) in adapter_sites(base).items():
            r = rank if rank > 0 else max(4, dim // 8)
            key = name.replace(".", "_")
            self.adapters[key] = Bottleneck(dim, r, conv=conv)
            modules[name].register_forward_hook(self._hook(key))

    def _hook(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return self.adapters[key](output)

        return hook

    def input_shape(self) -> tuple[int, ...]:
        """The base model's input shape."""
        return self.base.input_shape()  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the adapted model.

        Args:
            x: a batch of the base model's inputs.
        """
        return self.base(x)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter weights only."""
        return {k: v.detach().clone() for k, v in self.adapters.state_dict().items()}


def fit_adapter(
    fused: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AdapterConfig
) -> tuple[AdaptedModel, list[float], Release | None]:
    """Attach adapters to ``fused`` and train them on ``(x, y)``; returns model, loss history, ledger entry.

    Args:
        fused: the fused model.
        x: calibration inputs.
        y: calibration labels ``[n]`` (class indices).
        config: the adapter's training settings (``private``: DP-SGD).

    Raises:
        ShapeError: inputs that do not fit the model, or labels not one per input or outside its classes.
        DataError: non-finite inputs.
    """
    check_inputs(fused, x, what="adapter calibration inputs")
    check_finite("adapter calibration inputs", x)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ShapeError("adapter calibration labels", y.shape, f"[{x.shape[0]}] (one label per input)")
    num_classes = getattr(fused, "num_classes", None)
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ShapeError("adapter calibration label range", (int(y.min()), int(y.max())), f"labels in [0, {num_classes - 1}]")
    if config.recalibrate_bn:
        recalibrate_batchnorm(fused, x)
    fused.eval()
    model = AdaptedModel(fused, rank=config.rank)
    params = [p for p in model.adapters.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    if config.private:
        return _fit_private(model, x, y, config, opt, history)
    x_fit, y_fit, x_val, y_val = _holdout(x, y, config.val_fraction, g)
    best_loss, best_state, since_best = _val_loss(model, x_val, y_val), model.adapter_state(), 0
    n = x_fit.shape[0]
    for _ in range(config.epochs):
        model.adapters.train()
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_fit[idx]), y_fit[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / n)
        if x_val is None:
            continue
        val = _val_loss(model, x_val, y_val)
        if val < best_loss:
            best_loss, best_state, since_best = val, model.adapter_state(), 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    if x_val is not None:
        model.adapters.load_state_dict(best_state)
    return model.eval(), history, None


def _holdout(
    x: torch.Tensor, y: torch.Tensor, fraction: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n_val = int(round(fraction * x.shape[0]))
    if n_val < 1 or n_val >= x.shape[0]:
        return x, y, None, None
    order = torch.randperm(x.shape[0], generator=g)
    return x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]


@torch.no_grad()
def _val_loss(model: AdaptedModel, x: torch.Tensor | None, y: torch.Tensor | None) -> float:
    if x is None or y is None:
        return math.inf
    model.eval()
    return float(F.cross_entropy(model(x), y))


def _fit_private(
    model: AdaptedModel, x: torch.Tensor, y: torch.Tensor, config: AdapterConfig, opt: torch.optim.Optimizer,
    history: list[float],
) -> tuple[AdaptedModel, list[float], Release]:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(config.seed))
    engine = PrivacyEngine(accountant="rdp")
    # Opacus needs every trainable module to be supported; the frozen base has no trainable parameters
    private_model, private_opt, private_loader = engine.make_private_with_epsilon(
        module=model.adapters, optimizer=opt, data_loader=loader, target_epsilon=config.dp_epsilon,
        target_delta=config.dp_delta, epochs=max(1, config.epochs), max_grad_norm=config.max_grad_norm,
    )
    # route the hooks through the grad-sample wrapper so per-example gradients are recorded
    model.adapters = private_model._module  # the same modules, now carrying Opacus hooks
    for _ in range(max(1, config.epochs)):
        total, count = 0.0, 0
        for xb, yb in private_loader:
            if xb.shape[0] == 0:
                continue
            private_opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            private_opt.step()
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
        history.append(total / max(count, 1))
    spent = float(engine.get_epsilon(config.dp_delta))
    release = Release(
        "adapter_dp_sgd", "adapter", "dp-sgd (opacus, rdp accountant)", spent, config.dp_delta, 1,
        unit="calibration example", neighbouring="add/remove one calibration example",
    )
    return model.eval(), history, release
