import json
import math

import pytest
import torch

from pluribus.errors import DataError, ShapeError
from pluribus.fusion.core.models import MLP, SmallCNN
from pluribus.fusion.flower.party_files import (
    architecture_of,
    build_model,
    load_party_data,
    load_party_model,
    read_party_architecture,
    save_party_data,
    save_party_model,
)
from pluribus.io import save_tensors


@pytest.mark.parametrize("model", [MLP(12, (5, 7), 3), SmallCNN(2, (4, 6), 8, 5, 8)], ids=["mlp", "cnn"])
def test_party_model_roundtrip_is_exact_and_needs_no_pickle(tmp_path, model):
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_()
    path = save_party_model(tmp_path / "m.safetensors", model, party="a")
    assert read_party_architecture(path) == architecture_of(model)
    loaded = load_party_model(path, architecture=architecture_of(model))
    assert type(loaded) is type(model)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle
    meta = build_model(architecture_of(model), device="meta")
    assert all(v.is_meta for v in meta.state_dict().values())


def test_party_model_of_another_architecture_is_rejected(tmp_path):
    path = save_party_model(tmp_path / "m.safetensors", MLP(12, (5,), 3))
    with pytest.raises(DataError, match=r"m.safetensors.*another architecture: mlp\(in_features=12, hidden=\[5\]"):
        load_party_model(path, architecture=architecture_of(MLP(12, (6,), 3)))


def test_corrupted_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.safetensors: file not found"):
        load_party_model(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DataError, match="bad.safetensors: not a readable safetensors file"):
        load_party_model(bad)
    plain = save_tensors(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(DataError, match="no 'pluribus_party' metadata"):
        load_party_model(plain)


def _rewrite(path, tensors, meta):
    save_tensors(path, tensors, metadata={"pluribus_party": json.dumps(meta)})


def test_tampered_shapes_tensors_and_architecture_fields(tmp_path):
    model = MLP(12, (5,), 3)
    path = save_party_model(tmp_path / "m.safetensors", model)
    meta = {"format": "pluribus.fusion.party-model/1", "architecture": architecture_of(model)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _rewrite(path, {**state, "layers.0.weight": torch.zeros(5, 11)}, meta)
    with pytest.raises(ShapeError, match=r"tensor 'layers.0.weight' has shape \[5, 11\], expected \[5, 12\]"):
        load_party_model(path)
    _rewrite(path, {k: v for k, v in state.items() if k != "layers.1.bias"}, meta)
    with pytest.raises(DataError, match=r"missing \['layers.1.bias'\]"):
        load_party_model(path)
    state["layers.1.bias"][0] = math.nan
    _rewrite(path, state, meta)
    with pytest.raises(DataError, match="'layers.1.bias' holds non-finite values"):
        load_party_model(path)
    _rewrite(path, state, {**meta, "architecture": {"kind": "resnet"}})
    with pytest.raises(DataError, match="unknown architecture kind 'resnet'"):
        load_party_model(path)
    _rewrite(path, state, {**meta, "architecture": {**architecture_of(model), "hidden": "5"}})
    with pytest.raises(DataError, match="field 'hidden'"):
        load_party_model(path)


def test_party_data_roundtrip_and_errors(tmp_path):
    model = MLP(12, (5,), 3)
    x, y = torch.rand(7, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    path = save_party_data(tmp_path / "d.safetensors", x, y)
    x2, y2 = load_party_data(path, model=model, need_labels=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ShapeError, match="tensor 'x'"):
        load_party_data(path, model=MLP(10, (5,), 3))
    save_party_data(path, x, torch.tensor([0, 1, 2, 0, 1, 2, 3]))
    with pytest.raises(DataError, match=r"labels outside \[0, 2\]"):
        load_party_data(path, model=model)
    save_party_data(path, x)
    assert load_party_data(path)[1] is None
    with pytest.raises(DataError, match="field 'y'"):
        load_party_data(path, need_labels=True)
    bad = x.clone()
    bad[0, 0] = math.inf
    save_tensors(path, {"x": bad})
    with pytest.raises(DataError, match="finite"):
        load_party_data(path)
