"""The split model: client embedding -> server general model -> client adapter + task head.

Clients keep the patch/token embedding (input side) and a task adapter plus head (output side); the server keeps
one transformer "general model" shared by every client. Only tokens ``z`` [B, T, D] and features ``f`` [B, T, D]
(and their gradients) cross the split. LayerNorm only on the server (no BatchNorm: its statistics would mix tasks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pluribus.errors import ConfigError, ShapeError
from pluribus.federated.core.config import ModelConfig
from pluribus.federated.core.task import ClientTask


class PatchEmbedding(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, (H/p)(W/p), D] with learned positions (stays on the client).

    Args:
        image_size: the images' side length.
        patch: the patch side length (must divide ``image_size``).
        channels: the images' channels.
        dim: the embedding width D.

    Raises:
        ConfigError: ``patch`` does not divide ``image_size``.
    """

    def __init__(self, image_size: int, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ConfigError(f"model.patch={patch} must divide the image size {image_size}")
        self.image_size, self.patch, self.channels = image_size, patch, channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.num_tokens = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            x: ``[B, C, S, S]`` images.

        Raises:
            ShapeError: ``x`` does not have that shape.
        """
        expected = (None, self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or any(e is not None and s != e for s, e in zip(x.shape, expected, strict=True)):
            raise ShapeError("client images", tuple(x.shape), f"[B, {self.channels}, {self.image_size}, {self.image_size}]")
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TokenEmbedding(nn.Module):
    """Feature tokens [B, T, F] (Yeast chunks, a user's rated items) -> [B, T, D] with learned positions.

    Args:
        num_tokens: tokens per sample T.
        features: features per token F.
        dim: the embedding width D.
    """

    def __init__(self, num_tokens: int, features: int, dim: int) -> None:
        super().__init__()
        self.num_tokens, self.features = num_tokens, features
        self.proj = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of token sequences.

        Args:
            x: ``[B, T, F]`` feature tokens.

        Raises:
            ShapeError: ``x`` does not have that shape.
        """
        if x.dim() != 3 or x.shape[1] != self.num_tokens or x.shape[2] != self.features:
            raise ShapeError("client tokens", tuple(x.shape), f"[B, {self.num_tokens}, {self.features}]")
        return self.proj(x) + self.pos


class GeneralModel(nn.Module):
    """The server's shared backbone: a pre-LN transformer encoder over tokens [B, T, D] -> [B, T, D].

    Args:
        config: the model settings (width, depth, heads).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dim = config.dim
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, dim_feedforward=config.dim * config.mlp_ratio, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """General features of client tokens.

        Args:
            z: ``[B, T, D]`` client embeddings.
        """
        return self.norm(self.blocks(z))

    def segments(self) -> list[int]:
        """Sizes of the parameter tensors in flattening order (the 'layers' of per-layer projection)."""
        return [p.numel() for p in self.parameters()]

    def num_parameters(self) -> int:
        """Total trainable parameters."""
        return sum(p.numel() for p in self.parameters())


class TaskAdapter(nn.Module):
    """Residual token MLP that adapts shared features to the client's task (stays on the client)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Adapted features."""
        return f + self.mlp(self.norm(f))


class TaskHead(nn.Module):
    """Task output: pooled logits (classification, multi-label) or per-patch pixels (dense tasks)."""

    def __init__(self, kind: str, dim: int, num_outputs: int, patch: int = 1, grid: int = 1) -> None:
        super().__init__()
        self.kind, self.patch, self.grid = kind, patch, grid
        dense = kind in ("segmentation", "reconstruction")
        self.proj = nn.Linear(dim, patch * patch * num_outputs if dense else num_outputs)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] or dense maps [B, 1, H, W]."""
        if self.kind in ("segmentation", "reconstruction"):
            b = f.shape[0]
            pix = self.proj(f).view(b, self.grid, self.grid, self.patch, self.patch)
            return pix.permute(0, 1, 3, 2, 4).reshape(b, 1, self.grid * self.patch, self.grid * self.patch)
        return self.proj(f.mean(1))


class ClientModel(nn.Module):
    """A client's private modules: ``embed`` (input side) and ``adapter`` + ``head`` (output side).

    Args:
        task: the client's task (input shape and kind, outputs).
        config: the model settings.
        common_seed: the seed of a common embedding (the same weights on every client).
    """

    def __init__(self, task: ClientTask, config: ModelConfig, *, common_seed: int = 0) -> None:
        super().__init__()
        self.kind = task.kind
        shape = task.input_shape
        patch = 1
        grid = 1
        with _common_init(config, common_seed):  # a common embedding: the same weights on every client
            if task.input_kind == "image":
                channels, size = shape[0], shape[1]
                patch = config.patch if config.patch > 0 and size % config.patch == 0 else _auto_patch(size)
                self.embed: nn.Module = PatchEmbedding(size, patch, channels, config.dim)
                grid = size // patch
            else:
                self.embed = TokenEmbedding(shape[0], shape[1], config.dim)
        if config.common_embedding == "frozen":
            self.embed.requires_grad_(False)
        self.adapter = TaskAdapter(config.dim, config.adapter_hidden)
        self.head = TaskHead(task.kind, config.dim, task.num_outputs, patch, grid)

    def output(self, f: torch.Tensor) -> torch.Tensor:
        """Task output from general features.

        Args:
            f: ``[B, T, D]`` general features from the server.
        """
        return self.head(self.adapter(f))

    def output_parameters(self) -> list[nn.Parameter]:
        """Adapter and head parameters (trained from the client's own loss)."""
        return [*self.adapter.parameters(), *self.head.parameters()]


def common_embedding_seed(run_seed: int) -> int:
    """The seed a run's common embedding is drawn from (every client the same, each run its own)."""
    return run_seed * 1009


@contextmanager
def _common_init(config: ModelConfig, seed: int) -> Iterator[None]:
    """Draw the embedding from ``seed`` alone when it is common (and leave the caller's RNG as it was)."""
    if config.common_embedding == "none":
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_common_inputs(tasks: Sequence[ClientTask], config: ModelConfig) -> None:
    """ConfigError unless every client's inputs have one kind and shape (a common embedding needs them)."""
    if config.common_embedding == "none":
        return
    kinds = {(t.input_kind, t.input_shape) for t in tasks}
    if len(kinds) > 1:
        raise ConfigError(f"model.common_embedding={config.common_embedding!r} needs every client's inputs of one "
                          f"kind and shape; got {sorted(map(str, kinds))}")


def regime_parameter_counts(tasks: Sequence[ClientTask], small: ModelConfig, large: ModelConfig) -> dict[str, int]:
    """Parameters of FedBone's regime: the server's large backbone, the largest FedBone client part (embedding,
    adapter, head around the large backbone) and the largest small full model a client trains alone."""
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    client_parts = [count(ClientModel(t, large)) for t in tasks]
    small_full = [count(ClientModel(t, small)) + count(GeneralModel(small)) for t in tasks]
    return {"server_backbone": count(GeneralModel(large)), "fedbone_client_max": max(client_parts),
            "small_full_max": max(small_full), "small_backbone": count(GeneralModel(small))}


def _auto_patch(size: int) -> int:
    for p in (7, 4, 2, 1):
        if size % p == 0 and size // p >= 2:
            return p
    return 1


def task_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The client's loss for its task kind (mean over the batch)."""
    if kind in ("multiclass", "binary"):
        return F.cross_entropy(out, y)
    if kind in ("multilabel", "segmentation"):
        return F.binary_cross_entropy_with_logits(out, y)
    if kind == "reconstruction":
        return F.mse_loss(torch.sigmoid(out), y)
    raise ConfigError(f"unknown task kind {kind!r}")


def task_metrics(kind: str, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test metrics for a task kind: accuracy/AUC, micro-F1/mean AUC, mIoU, or RMSE."""
    from sklearn.metrics import roc_auc_score

    out = out.detach().float()
    if kind in ("multiclass", "binary"):
        pred = out.argmax(1)
        metrics = {"accuracy": float((pred == y).float().mean())}
        if out.shape[1] == 2:
            prob = torch.softmax(out, 1)[:, 1].numpy()
            labels = y.numpy()
            metrics["auc"] = float(roc_auc_score(labels, prob)) if len(np.unique(labels)) == 2 else float("nan")
        return metrics
    if kind == "multilabel":
        pred = (out > 0).float()
        tp = float((pred * y).sum())
        fp = float((pred * (1 - y)).sum())
        fn = float(((1 - pred) * y).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1e-12)
        aucs = [roc_auc_score(y[:, j].numpy(), out[:, j].numpy()) for j in range(y.shape[1])
                if 0 < float(y[:, j].mean()) < 1]
        return {"micro_f1": f1, "mean_auc": float(np.mean(aucs)) if aucs else float("nan")}
    if kind == "segmentation":
        pred = (out > 0).float()
        ious = []
        for cls in (0.0, 1.0):
            p, t = pred == cls, y == cls
            union = float((p | t).sum())
            if union > 0:
                ious.append(float((p & t).sum()) / union)
        return {"miou": float(np.mean(ious)), "pixel_accuracy": float((pred == y).float().mean())}
    if kind == "reconstruction":
        return {"rmse": math.sqrt(float(F.mse_loss(torch.sigmoid(out), y)))}
    raise ConfigError(f"unknown task kind {kind!r}")


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate the parameters' .grad (zeros where None) into one vector."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def assign_flat_grad(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    """Write a flat vector into the parameters' .grad fields."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset: offset + n].view_as(p).clone()
        offset += n
    if offset != vector.numel():
        raise ShapeError("flat gradient", tuple(vector.shape), f"[{offset}]")
