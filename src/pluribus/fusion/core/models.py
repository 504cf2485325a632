"""Party models for fusion (an MLP and a small residual CNN with BatchNorm) and local training helpers."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pluribus.errors import ConfigError, ShapeError


class MLP(nn.Module):
    """A ReLU MLP ``in -> hidden... -> classes``; inputs of any shape are flattened.

    Args:
        in_features: the flattened input size.
        hidden: the hidden layers' widths.
        num_classes: the number of classes.

    Raises:
        ConfigError: a size below 1.
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or not hidden or min(hidden) < 1:
            raise ConfigError(f"MLP sizes must be >= 1, got in={in_features}, hidden={hidden}, out={num_classes}")
        self.in_features = in_features
        self.hidden = tuple(int(h) for h in hidden)
        self.num_classes = num_classes
        widths = (in_features, *self.hidden, num_classes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example (after flattening)."""
        return (self.in_features,)

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-ReLU activations of each hidden layer, each [batch, width].

        Args:
            x: a batch of inputs.
        """
        h = x.reshape(x.shape[0], -1)
        out = []
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
            out.append(h)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden representation [batch, hidden[-1]].

        Args:
            x: a batch of inputs.
        """
        return self.hidden_activations(x)[-1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Map the last hidden representation to logits.

        Args:
            h: ``[batch, hidden[-1]]``.
        """
        return self.layers[-1](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, classes].

        Args:
            x: a batch of inputs.
        """
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """conv-BN-ReLU stem, one residual block (two conv-BN), conv-BN-ReLU, two 2x2 pools, then 2 FC layers.

    Args:
        in_channels: the images' channels.
        channels: the two convolution widths.
        hidden: the width of the first fully connected layer.
        num_classes: the number of classes.
        image_size: the images' side length (at least 4).

    Raises:
        ConfigError: ``image_size`` below 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        num_classes: int = 10,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ConfigError(f"SmallCNN needs image_size >= 4 (two 2x2 pools), got {image_size}")
        c1, c2 = channels
        self.in_channels = in_channels
        self.channels = (c1, c2)
        self.hidden = hidden
        self.num_classes = num_classes
        self.image_size = image_size
        self.spatial = image_size // 4
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(c1)
        self.block_conv1 = nn.Conv2d(c1, c1, 3, padding=1)
        self.block_bn1 = nn.BatchNorm2d(c1)
        self.block_conv2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.block_bn2 = nn.BatchNorm2d(c1)
        self.conv3 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(c2 * self.spatial * self.spatial, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return (self.in_channels, self.image_size, self.image_size)

    def _as_image(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() == 2 and x.shape[1] == self.in_channels * self.image_size**2:
            x = x.reshape(-1, self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != self.input_shape():
            raise ShapeError("SmallCNN input", x.shape, f"[batch, {', '.join(map(str, self.input_shape()))}]")
        return x

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-channel (or per-unit) mean post-ReLU activations: residual stream, block, conv3, fc1.

        Args:
            x: a batch of images.
        """
        x = self._as_image(x)
        stream = F.relu(self.stem_bn(self.stem(x)))
        inner = F.relu(self.block_bn1(self.block_conv1(stream)))
        stream = F.relu(stream + self.block_bn2(self.block_conv2(inner)))
        pooled = F.max_pool2d(stream, 2)
        c3 = F.relu(self.bn3(self.conv3(pooled)))
        h = F.relu(self.fc1(F.max_pool2d(c3, 2).flatten(1)))
        return [stream.mean(dim=(2, 3)), inner.mean(dim=(2, 3)), c3.mean(dim=(2, 3)), h]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fc1 representation [batch, hidden].

        Args:
            x: a batch of images.
        """
        return self.hidden_activations(x)[-1]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Map the fc1 representation to logits.

        Args:
            h: the last hidden representation.
        """
        return self.fc2(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, classes].

        Args:
            x: a batch of images.
        """
        return self.head(self.features(x))


FusableModel = MLP | SmallCNN


def clone_model(model: nn.Module) -> nn.Module:
    """A fresh model of the same architecture with copied parameters and buffers."""
    if isinstance(model, MLP):
        new: nn.Module = MLP(model.in_features, model.hidden, model.num_classes)
    elif isinstance(model, SmallCNN):
        new = SmallCNN(model.in_channels, model.channels, model.hidden, model.num_classes, model.image_size)
    else:
        raise ConfigError(f"cannot clone {type(model).__name__}; fusion supports MLP and SmallCNN")
    new.load_state_dict(model.state_dict())
    return new


def check_inputs(model: nn.Module, x: torch.Tensor, *, what: str = "inputs") -> None:
    """Raise ShapeError unless ``x`` is a batch of examples of the model's input shape."""
    expected = model.input_shape() if hasattr(model, "input_shape") else None  # type: ignore[operator]
    if expected is None:
        return
    per_example = math.prod(expected)
    ok = x.dim() >= 2 and math.prod(x.shape[1:]) == per_example
    if isinstance(model, SmallCNN):
        ok = ok and (tuple(x.shape[1:]) == expected or x.dim() == 2 or (x.dim() == 3 and model.in_channels == 1))
    if not ok:
        raise ShapeError(what, x.shape, f"[batch, {', '.join(map(str, expected))}] (or flattened)")


def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode."""
    check_inputs(model, x)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                continue
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def ensemble_accuracy(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the averaged softmax of several models (a non-private upper-bound reference)."""
    probs = sum(F.softmax(m.eval()(x), dim=1) for m in models)
    assert isinstance(probs, torch.Tensor)
    return float((probs.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``x`` (cumulative average), in place."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, x.shape[0], batch_size):
        model(x[start : start + batch_size])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    return model.eval()
