"""io, config and run folders: atomic writes, TOML configs, resumable runs."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from pluribus.config import (
    config_from_dict,
    flatten_config,
    load_config,
    save_config,
    unflatten_config,
)
from pluribus.errors import ConfigError, DataError, ShapeError, check_shape
from pluribus.io import atomic_path, load_tensors, read_json, save_tensors, write_json
from pluribus.runs import RunFolder


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    layers: tuple[int, ...] = (64, 32)


@dataclass(frozen=True)
class Outer:
    name: str = "run"
    mode: Literal["a", "b"] = "a"
    steps: int = 10
    use_x: bool = False
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_tensors_and_json_roundtrip(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(6.0).view(2, 3).t()})
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["w"], torch.arange(6.0).view(2, 3).t())
    write_json(tmp_path / "m.json", {"a": torch.tensor([1, 2]), "b": 1.5})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1.5}
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(DataError) as err:
        read_json(tmp_path / "bad.json")
    assert err.value.line == 2
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="safetensors"):
        load_tensors(tmp_path / "bad.safetensors")


def test_config_toml_roundtrip_and_flatten(tmp_path):
    cfg = Outer(name="x", mode="b", steps=3, inner=Inner(lr=0.5, layers=(8,)))
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(Outer, tmp_path / "c.toml") == cfg
    flat = flatten_config(cfg)
    assert flat["inner.lr"] == 0.5 and flat["inner.layers"] == "8"
    assert unflatten_config(Outer, flat) == cfg


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\]"):
        config_from_dict(Outer, {"stepz": 3})
    with pytest.raises(ConfigError, match="config.steps: expected an integer"):
        config_from_dict(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match="not one of"):
        config_from_dict(Outer, {"mode": "c"})
    with pytest.raises(ConfigError, match="config.inner.lr: expected a number"):
        config_from_dict(Outer, {"inner": {"lr": "fast"}})
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(DataError, match="malformed TOML"):
        load_config(Outer, tmp_path / "bad.toml")


def test_check_shape():
    check_shape("x", (3, 4), (None, 4))
    with pytest.raises(ShapeError, match=r"x has shape \[3, 5\], expected \[\*, 4\]"):
        check_shape("x", (3, 5), (None, 4))


def test_run_folder_resume_and_checkpoints(tmp_path):
    run = RunFolder(tmp_path / "r", Outer())
    run.log_metrics("train", {"loss": 1.0})
    run.log_metrics("train", {"acc": 0.5})
    run.save_checkpoint("step10", {"w": torch.ones(2)}, {"step": 10})
    run.mark_done("train")
    again = RunFolder(tmp_path / "r", Outer())
    assert again.is_done("train") and not again.is_done("eval")
    assert again.metrics() == {"train": {"loss": 1.0, "acc": 0.5}}
    tensors, meta = again.load_checkpoint("step10")
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {"step": 10}
    assert again.load_checkpoint("missing") is None
    with pytest.raises(ConfigError, match="different config"):
        RunFolder(tmp_path / "r", Outer(steps=99))
    with pytest.raises(ConfigError, match="already holds a run"):
        RunFolder(tmp_path / "r", Outer(), resume=False)


def test_cli_import_leaves_heavy_libraries_unloaded():
    # `pluribus --help` must not pay for torch, transformers, scikit-learn, pandas or flwr
    import subprocess
    import sys

    code = ("import sys, pluribus.cli; heavy = {'torch', 'transformers', 'sklearn', 'pandas', 'flwr'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_metadata_lives_in_the_tensor_file(tmp_path):
    # a crash between two separate writes could pair new tensors with an old step: the file alone must decide
    import numpy as np

    run = RunFolder(tmp_path / "r", Outer())
    run.save_checkpoint("last", {"w": torch.ones(2)}, {"step": 1, "loss": np.float32(0.5)})
    run.save_checkpoint("last", {"w": torch.full((2,), 2.0)}, {"step": 2, "loss": np.float32(0.25)})
    (tmp_path / "r" / "checkpoints" / "last.json").write_text('{"step": 1}')  # stale sidecar
    tensors, meta = run.load_checkpoint("last")
    assert meta == {"step": 2, "loss": 0.25} and torch.equal(tensors["w"], torch.full((2,), 2.0))


def test_checkpoint_written_before_the_metadata_moved_into_the_file_still_loads(tmp_path):
    from pluribus.io import save_tensors, write_json

    run = RunFolder(tmp_path / "r", Outer())
    save_tensors(run.checkpoint_path("last"), {"w": torch.ones(2)})  # the older layout: tensors + JSON sidecar
    write_json(tmp_path / "r" / "checkpoints" / "last.json", {"step": 3})
    tensors, meta = run.load_checkpoint("last")
    assert meta == {"step": 3} and torch.equal(tensors["w"], torch.ones(2))


def test_tensor_metadata_errors_name_the_file(tmp_path):
    from pluribus.errors import DataError
    from pluribus.io import load_tensor_metadata, save_tensors

    path = save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(1)}, metadata={"a": "not json", "b": "[1]"})
    with pytest.raises(DataError, match="no 'x' metadata") as err:
        load_tensor_metadata(path, "x")
    assert "t.safetensors" in str(err.value)
    with pytest.raises(DataError, match="not JSON"):
        load_tensor_metadata(path, "a")
    with pytest.raises(DataError, match="not a JSON object"):
        load_tensor_metadata(path, "b")
    with pytest.raises(DataError, match="not found"):
        load_tensor_metadata(tmp_path / "missing.safetensors", "a")


def test_set_threads_refuses_non_positive_counts():
    from pluribus.config import set_threads

    before = torch.get_num_threads()
    for bad in (0, -2, True):
        with pytest.raises(ConfigError, match="--threads"):
            set_threads(bad)
    set_threads(None)
    set_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_config_numbers_refuse_nan_and_keep_inf():
    @dataclass(frozen=True)
    class Rate:
        lr: float = 0.1

    with pytest.raises(ConfigError, match="config.lr: expected a number, got nan"):
        config_from_dict(Rate, {"lr": float("nan")})
    with pytest.raises(ConfigError, match="expected a number"):
        config_from_dict(Rate, {"lr": "nan"})
    assert config_from_dict(Rate, {"lr": "inf"}).lr == float("inf")
