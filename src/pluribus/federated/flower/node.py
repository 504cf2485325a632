"""What a FedBone client's SuperNode sets for itself: its partition index and its state directory."""

from __future__ import annotations

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
