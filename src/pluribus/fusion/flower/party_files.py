"""A party's own files: its trained model and its own data, as safetensors (never pickle).

A **party model file** holds the model's state dict and, in the safetensors metadata under
``pluribus_party``, the architecture (``{"kind": "mlp", "in_features": 64, "hidden": [32, 32],
"num_classes": 10}`` or ``{"kind": "cnn", "in_channels": 1, "channels": [16, 32], "hidden": 64,
"num_classes": 10, "image_size": 8}``), so a file rebuilds its model without code or pickle.
A **party data file** holds ``x`` (inputs, one row per example) and optionally ``y`` (integer labels).

Loading checks everything a party could get wrong and names the file and the tensor: a missing or
corrupted file, no or malformed architecture metadata, a state dict that does not fit the architecture,
non-finite values, and (with ``architecture=``) a file of another architecture than the one expected.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluribus.errors import DataError, ShapeError

if TYPE_CHECKING:
    import torch
    from torch import nn

PARTY_META = "pluribus_party"
PARTY_FORMAT = "pluribus.fusion.party-model/1"
DATA_META = "pluribus_party_data"
DATA_FORMAT = "pluribus.fusion.party-data/1"
_FIELDS = {"mlp": ("in_features", "hidden", "num_classes"),
           "cnn": ("in_channels", "channels", "hidden", "num_classes", "image_size")}


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """The architecture descriptor of a fusable model (JSON-ready; no weights)."""
    from pluribus.errors import ConfigError
    from pluribus.fusion.core.models import MLP, SmallCNN

    if isinstance(model, MLP):
        return {"kind": "mlp", "in_features": model.in_features, "hidden": list(model.hidden),
                "num_classes": model.num_classes}
    if isinstance(model, SmallCNN):
        return {"kind": "cnn", "in_channels": model.in_channels, "channels": list(model.channels),
                "hidden": model.hidden, "num_classes": model.num_classes, "image_size": model.image_size}
    raise ConfigError(f"cannot save a {type(model).__name__} as a party model; fusion supports MLP and SmallCNN")


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """A short human-readable form, e.g. ``mlp(in_features=64, hidden=[32, 32], num_classes=10)``."""
    fields = _FIELDS.get(str(arch.get("kind")), tuple(k for k in arch if k != "kind"))
    return f"{arch.get('kind')}(" + ", ".join(f"{k}={arch.get(k)}" for k in fields) + ")"


def build_model(arch: Mapping[str, Any], *, where: str = "architecture", device: str | None = None) -> nn.Module:
    """A fresh model of architecture ``arch``; DataError naming ``where`` and the field if it is malformed.

    ``device="meta"`` builds only the shapes (no memory, no values): what the hub uses to check releases.
    """
    import torch

    from pluribus.errors import ConfigError
    from pluribus.fusion.core.models import MLP, SmallCNN

    kind = arch.get("kind")
    if kind not in _FIELDS:
        raise DataError(f"unknown architecture kind {kind!r}", path=where, field="kind", expected="'mlp' or 'cnn'")
    missing = [k for k in _FIELDS[kind] if k not in arch]
    if missing:
        raise DataError(f"architecture {kind!r} lacks {missing}", path=where, field=missing[0])

    def ints(key: str, n: int | None = None) -> tuple[int, ...]:
        value = arch[key]
        items = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items) or (n is not None and len(items) != n):
            raise DataError(f"architecture field {key!r} is {value!r}", path=where, field=key,
                            expected=f"{'an integer' if n == 1 else f'{n} integers' if n else 'a list of integers'}")
        return tuple(int(v) for v in items)

    try:
        with torch.device(device) if device is not None else nullcontext():
            if kind == "mlp":
                return MLP(ints("in_features", 1)[0], ints("hidden"), ints("num_classes", 1)[0])
            c1, c2 = ints("channels", 2)
            return SmallCNN(ints("in_channels", 1)[0], (c1, c2), ints("hidden", 1)[0], ints("num_classes", 1)[0],
                            ints("image_size", 1)[0])
    except ConfigError as err:
        raise DataError(f"architecture {describe_architecture(arch)} is invalid: {err}", path=where) from None


def save_party_model(path: str | Path, model: nn.Module, *, party: str | None = None) -> Path:
    """Write ``model`` (state dict + architecture metadata) as a party model file, atomically.

    Args:
        path: the file to write.
        model: an MLP or SmallCNN.
        party: the party's name, kept in the metadata.

    Raises:
        ConfigError: another model class.
    """
    from pluribus.io import save_tensors

    meta = {"format": PARTY_FORMAT, "architecture": architecture_of(model), "party": party}
    return save_tensors(path, model.state_dict(), metadata={PARTY_META: json.dumps(meta)})


def read_party_architecture(path: str | Path) -> dict[str, Any]:
    """The architecture stored in a party model file (reads only the header)."""
    from pluribus.io import load_tensor_metadata

    meta = load_tensor_metadata(path, PARTY_META)
    if meta.get("format") != PARTY_FORMAT:
        raise DataError(f"not a party model file (format {meta.get('format')!r})", path=path, field="format",
                        expected=repr(PARTY_FORMAT))
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise DataError("party model file has no architecture object", path=path, field="architecture")
    return arch


def load_party_model(path: str | Path, *, architecture: Mapping[str, Any] | None = None) -> nn.Module:
    """The model in a party model file, in eval mode; ``architecture`` given: DataError if the file's differs.

    Args:
        path: the party model file.
        architecture: the architecture it must have, or None for any.

    Raises:
        DataError: not a party model file, another architecture, tensors that do not fit it, or non-finite values.
        ShapeError: a tensor of the wrong shape.
    """
    import torch

    from pluribus.io import load_tensors

    arch = read_party_architecture(path)
    if architecture is not None and dict(architecture) != arch:
        raise DataError(f"party model of another architecture: {describe_architecture(arch)}", path=path,
                        field="architecture", expected=describe_architecture(architecture))
    model = build_model(arch, where=str(path))
    tensors = load_tensors(path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DataError(f"tensors do not fit {describe_architecture(arch)}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}", path=path)
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ShapeError(f"{path}: tensor {key!r}", value.shape, f"{list(expected[key].shape)} for "
                             f"{describe_architecture(arch)}")
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise DataError(f"tensor {key!r} holds non-finite values", path=path, field=key)
    model.load_state_dict(tensors)
    return model.eval()


def save_party_data(path: str | Path, x: torch.Tensor, y: torch.Tensor | None = None) -> Path:
    """Write a party's own data (inputs ``x`` and optional integer labels ``y``) as safetensors, atomically.

    Args:
        path: the file to write.
        x: the inputs.
        y: integer labels, one per row of ``x``, or None.

    Raises:
        ShapeError: ``y`` not one label per row of ``x``.
    """
    from pluribus.io import save_tensors

    tensors = {"x": x.float()}
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise ShapeError("labels y", y.shape, f"[{x.shape[0]}] (one per row of x)")
        tensors["y"] = y.long()
    return save_tensors(path, tensors, metadata={DATA_META: json.dumps({"format": DATA_FORMAT})})


def load_party_data(path: str | Path, *, model: nn.Module | None = None,
                    need_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y or None) from a party data file; with ``model``, x must be a batch of its inputs.

    Args:
        path: the party data file.
        model: a model whose inputs ``x`` must fit, or None.
        need_labels: require the labels ``y``.

    Raises:
        DataError: no ``x``, non-finite or non-float ``x``, or no ``y`` when needed.
        ShapeError: ``x`` empty or not the model's inputs, or ``y`` not one label per example.
    """
    import torch

    from pluribus.fusion.core.models import check_inputs
    from pluribus.io import load_tensors

    tensors = load_tensors(path)
    if "x" not in tensors:
        raise DataError("party data file has no tensor 'x'", path=path, field="x")
    x, y = tensors["x"], tensors.get("y")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ShapeError(f"{path}: tensor 'x'", x.shape, "[examples, ...] with at least one example")
    if not torch.is_floating_point(x) or not bool(torch.isfinite(x).all()):
        raise DataError("tensor 'x' must hold finite floating-point values", path=path, field="x")
    if y is not None and (y.dim() != 1 or y.shape[0] != x.shape[0] or torch.is_floating_point(y)):
        raise ShapeError(f"{path}: tensor 'y'", y.shape, f"[{x.shape[0]}] integer labels")
    if need_labels and y is None:
        raise DataError("labels needed but the file has no tensor 'y'", path=path, field="y")
    if model is not None:
        check_inputs(model, x, what=f"{path}: tensor 'x'")
        classes = getattr(model, "num_classes", None)
        if y is not None and isinstance(classes, int) and y.numel():
            if int(y.min()) < 0 or int(y.max()) >= classes:
                raise DataError(f"labels outside [0, {classes - 1}]", path=path, field="y")
    return x.float(), y
