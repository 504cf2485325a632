"""An institution's node config: its own files only (absolute, checked), written as Flower's SuperNode reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.deploy.address import Address
from pluribus.deploy.join import institution_node_config, node_config_text, supernode_args
from pluribus.errors import ConfigError, DataError


def test_flower_reads_back_the_node_config(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args  # what flower-supernode runs on --node-config

    data, model = tmp_path / "my data.safetensors", tmp_path / "model.safetensors"
    data.write_bytes(b"x")
    model.write_bytes(b"x")
    config = institution_node_config(partition_id=1, state_dir=tmp_path / "state", data_file=data,
                                     model_file=model, party_name="hospital-b", extra={"worker": True, "budget": 8.5})
    assert config["data-file"] == str(data.resolve()) and config["fused-out"].endswith("state/fused.safetensors")
    assert parse_config_args([node_config_text(config)]) == config
    args = supernode_args(Address("10.1.2.3", 9093), ca=tmp_path / "ca.crt", private_key=tmp_path / "k.key",
                          node_config=config, runtime_port=9094)
    assert "--insecure" not in args and args[args.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert "--insecure" in supernode_args(Address("10.1.2.3", 9093), ca=None, private_key=None, node_config={},
                                          runtime_port=9094)


def test_a_node_names_only_files_it_has(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        institution_node_config(partition_id=0, state_dir=tmp_path, data_file=tmp_path / "other-institution.st")
    with pytest.raises(ConfigError, match="--model-file, --data-file and --party-name"):
        institution_node_config(partition_id=0, state_dir=tmp_path, party_name="a")
    with pytest.raises(ConfigError, match="set by its own option"):
        institution_node_config(partition_id=0, state_dir=tmp_path, extra={"partition-id": 3})
    with pytest.raises(ConfigError, match="no spaces"):
        node_config_text({"a b": 1})
