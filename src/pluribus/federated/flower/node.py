"""What a FedBone client's SuperNode sets for itself: its partition index, its own data file and its state
directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context

from pluribus.errors import ConfigError


def client_index(context: Context, num_clients: int) -> int:
    """This node's client index from node_config['partition-id']."""
    if "partition-id" not in context.node_config:
        raise ConfigError("node_config lacks 'partition-id' (start the SuperNode with --node-config 'partition-id=K')")
    index = int(context.node_config["partition-id"])
    if not 0 <= index < num_clients:
        raise ConfigError(f"partition-id {index} out of range for {num_clients} clients")
    return index


def client_state_dir(context: Context, index: int, state_root: str | Path | None = None) -> Path | None:
    """Where this client keeps its checkpoints: node_config 'state-dir', else <root>/partition-<index> for the
    factory's ``state_root`` or the run_config's 'client-state-root'; None if none is set."""
    if context.node_config.get("state-dir"):
        return Path(str(context.node_config["state-dir"]))
    root = state_root if state_root is not None else context.run_config.get("client-state-root")
    return Path(str(root)) / f"partition-{index}" if root else None


def client_data_file(context: Context, index: int, data_files: Sequence[str | Path] | None = None) -> Path | None:
    """This client's own data file: node_config 'data-file', else ``data_files[index]`` (the app factory's, for
    engines that configure the nodes themselves); None if neither names one."""
    if context.node_config.get("data-file"):
        return Path(str(context.node_config["data-file"]))
    if data_files is not None:
        if not 0 <= index < len(data_files):
            raise ConfigError(f"client {index}: the app has data files for clients 0..{len(data_files) - 1} only")
        return Path(data_files[index])
    return None
