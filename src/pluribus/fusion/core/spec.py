"""Permutation specs: which (tensor, axis) pairs each hidden-unit permutation touches.

A permutation ``p`` of a hidden layer maps new unit ``i`` to old unit ``p[i]`` (``new = old[p]``) on
every axis it touches. An axis may hold ``block`` consecutive entries per unit: the first FC layer after a
conv stack sees each channel as a contiguous block of ``H*W`` input columns. Layers that write into one
residual stream share a permutation. The input and the output (class order) are never permuted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pluribus.errors import ConfigError, ShapeError
from pluribus.fusion.core.models import MLP, SmallCNN

Params = dict[str, torch.Tensor]
Perms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AxisRef:
    """One axis of one tensor that a permutation acts on (``block`` entries per unit)."""

    param: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation name -> size and touched axes; ``order`` runs from the input side to the output side.

    Attributes:
        sizes: permutation name -> its size (units permuted).
        axes: permutation name -> the tensor axes it permutes.
        order: the permutations from the input side to the output side (default: the order of ``sizes``).

    Raises:
        ConfigError: ``sizes`` and ``axes`` name different permutations, or two permutations claim one axis.
    """

    sizes: Mapping[str, int]
    axes: Mapping[str, tuple[AxisRef, ...]]
    order: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if set(self.sizes) != set(self.axes):
            raise ConfigError(f"spec sizes {sorted(self.sizes)} and axes {sorted(self.axes)} name different perms")
        if not self.order:
            object.__setattr__(self, "order", tuple(self.sizes))
        seen: dict[tuple[str, int], str] = {}
        for name, refs in self.axes.items():
            for ref in refs:
                key = (ref.param, ref.axis)
                if key in seen:
                    raise ConfigError(f"axis {ref.axis} of {ref.param!r} is claimed by perms {seen[key]!r} and {name!r}")
                seen[key] = name

    def param_axes(self, param: str) -> list[tuple[str, AxisRef]]:
        """The (perm name, axis ref) pairs acting on ``param``.

        Args:
            param: a tensor's name.
        """
        return [(name, ref) for name, refs in self.axes.items() for ref in refs if ref.param == param]

    def validate(self, params: Mapping[str, torch.Tensor], *, what: str = "model") -> None:
        """Raise ShapeError/ConfigError unless every referenced tensor exists with a matching axis size.

        Args:
            params: the tensors.
            what: what they are (named in the error).

        Raises:
            ShapeError: an axis whose size differs from its permutation's (a missing tensor is allowed: a release
                may omit some).
        """
        for name, refs in self.axes.items():
            for ref in refs:
                if ref.param not in params:
                    continue  # a release may omit tensors (e.g. BN running statistics under DP)
                shape = params[ref.param].shape
                if ref.axis >= len(shape) or shape[ref.axis] != self.sizes[name] * ref.block:
                    raise ShapeError(
                        f"{what} tensor {ref.param!r}",
                        shape,
                        f"axis {ref.axis} of size {self.sizes[name] * ref.block} (perm {name!r})",
                    )


def mlp_spec(model: MLP) -> PermutationSpec:
    """Spec of an MLP: one permutation per hidden layer (rows of W_l, b_l and columns of W_{l+1})."""
    sizes, axes = {}, {}
    for i, width in enumerate(model.hidden):
        name = f"h{i}"
        sizes[name] = width
        axes[name] = (
            AxisRef(f"layers.{i}.weight", 0),
            AxisRef(f"layers.{i}.bias", 0),
            AxisRef(f"layers.{i + 1}.weight", 1),
        )
    return PermutationSpec(sizes, axes, tuple(sizes))


def _bn(prefix: str) -> tuple[AxisRef, ...]:
    return tuple(AxisRef(f"{prefix}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var"))


def cnn_spec(model: SmallCNN) -> PermutationSpec:
    """Spec of SmallCNN: residual stream, block-inner, conv3 channels (flattened into fc1), fc1 units."""
    c1, c2 = model.channels
    block = model.spatial * model.spatial
    sizes = {"stream": c1, "block": c1, "conv3": c2, "fc1": model.hidden}
    axes = {
        "stream": (
            AxisRef("stem.weight", 0),
            AxisRef("stem.bias", 0),
            *_bn("stem_bn"),
            AxisRef("block_conv1.weight", 1),
            AxisRef("block_conv2.weight", 0),
            AxisRef("block_conv2.bias", 0),
            *_bn("block_bn2"),
            AxisRef("conv3.weight", 1),
        ),
        "block": (
            AxisRef("block_conv1.weight", 0),
            AxisRef("block_conv1.bias", 0),
            *_bn("block_bn1"),
            AxisRef("block_conv2.weight", 1),
        ),
        "conv3": (
            AxisRef("conv3.weight", 0),
            AxisRef("conv3.bias", 0),
            *_bn("bn3"),
            AxisRef("fc1.weight", 1, block),
        ),
        "fc1": (AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0), AxisRef("fc2.weight", 1)),
    }
    return PermutationSpec(sizes, axes, ("stream", "block", "conv3", "fc1"))


def spec_for(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a supported model (MLP or SmallCNN).

    Args:
        model: an MLP or SmallCNN.

    Raises:
        ConfigError: another model class.
    """
    if isinstance(model, MLP):
        return mlp_spec(model)
    if isinstance(model, SmallCNN):
        return cnn_spec(model)
    raise ConfigError(f"no permutation spec for {type(model).__name__}; pass a PermutationSpec explicitly")


def identity_perms(spec: PermutationSpec) -> Perms:
    """The identity permutation for every perm of ``spec``."""
    return {name: torch.arange(n) for name, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, *, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation for every perm of ``spec``."""
    return {name: torch.randperm(n, generator=generator) for name, n in spec.sizes.items()}


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a unit permutation to ``block`` consecutive entries per unit."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)[None, :]).reshape(-1)


def apply_perms(spec: PermutationSpec, params: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]) -> Params:
    """Permute ``params`` (a state dict or a release) by ``perms``; tensors the spec omits pass through.

    Args:
        spec: the permutation spec.
        params: the tensors.
        perms: permutation name -> index tensor.

    Raises:
        ShapeError: a permutation or axis of the wrong size.
    """
    spec.validate(params)
    out = dict(params)
    for name, refs in spec.axes.items():
        perm = perms[name]
        if perm.numel() != spec.sizes[name]:
            raise ShapeError(f"permutation {name!r}", perm.shape, f"[{spec.sizes[name]}]")
        for ref in refs:
            if ref.param in out:
                out[ref.param] = out[ref.param].index_select(ref.axis, block_index(perm, ref.block))
    return out


def unit_view(tensor: torch.Tensor, ref: AxisRef) -> torch.Tensor:
    """``tensor`` as a [units, features] matrix along the axis of ``ref`` (blocks kept with their unit)."""
    moved = tensor.movedim(ref.axis, 0)
    n = moved.shape[0] // ref.block
    return moved.reshape(n, -1)


def apply_transport(
    spec: PermutationSpec, params: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor]
) -> Params:
    """Apply soft alignment maps ``M`` [n_ref, n_other] (``new = M @ old`` on each touched axis)."""
    spec.validate(params)
    out = {k: v.clone() for k, v in params.items()}
    for name, refs in spec.axes.items():
        m = maps[name].to(torch.float64)
        for ref in refs:
            if ref.param not in out:
                continue
            t = out[ref.param].movedim(ref.axis, 0)
            shape = t.shape
            flat = t.reshape(spec.sizes[name], -1).to(torch.float64)
            new = (m @ flat).to(t.dtype).reshape(m.shape[0] * ref.block, *shape[1:])
            out[ref.param] = new.movedim(0, ref.axis)
    return out
