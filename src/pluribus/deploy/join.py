"""Join a federation from an institution's own host: Flower's SuperNode against a remote SuperLink, over TLS
checked with the federation's CA certificate, authenticated with the institution's own node key, and given a
node config that names this institution's own files only (its data file, its state folder; a PrivFusion party
also its model file and name).

The SuperNode keeps Flower's installed apps in ``<state>/flwr-home`` and logs to ``<state>/supernode.log``.
A key the SuperLink does not know is refused by the SuperLink (the SuperNode ends with Flower's exit code 305):
that is one line here, naming the key and the command that registers it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluribus.deploy.address import Address, check_superlink
from pluribus.deploy.certs import check_private_key
from pluribus.deploy.processes import flower_env, log_has, log_size, start_logged, wait_for
from pluribus.errors import ConfigError, DataError, PluribusError
from pluribus.flower_engines import free_port, stop_processes, tail

LOG, HOME = "supernode.log", "flwr-home"
CONNECTED = "SuperNode ID:"  # flower-supernode logs this once the SuperLink accepted (activated) the node
NOT_REGISTERED = "Failed to activate SuperNode"
FILE_KEYS = ("data-file", "model-file")  # node config entries that name this institution's own input files


@dataclass(frozen=True)
class JoinedSuperNode:
    """A SuperNode this process started: its process, its node config, log and state folder.

    Attributes:
        process: the ``flower-supernode`` process.
        node_config: its node config.
        log: its log file.
        state: its state folder.
    """

    process: subprocess.Popen[bytes]
    node_config: dict[str, Any]
    log: Path
    state: Path


def node_config_text(config: Mapping[str, Any]) -> str:
    """A node config as ``flower-supernode --node-config`` reads it (``key=value`` pairs; strings quoted).

    Args:
        config: key -> value (strings, numbers or booleans).

    Raises:
        ConfigError: a key with spaces, quotes or '=', or a value that is not a string, number or boolean.
    """
    parts = []
    for key, value in config.items():
        if not key or any(c.isspace() or c in "=\"'" for c in key):
            raise ConfigError(f"node config key {key!r}: no spaces, quotes or '='")
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"node config {key!r}: a string, a number or true/false, got {type(value).__name__}")
        parts.append(f"{key}={json.dumps(value)}")
    return " ".join(parts)


def institution_node_config(*, partition_id: int, state_dir: str | Path, data_file: str | Path | None = None,
                            model_file: str | Path | None = None, party_name: str | None = None,
                            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This institution's node config: its partition id, its state folder and its own files (absolute paths,
    each checked to exist). A PrivFusion party gives ``model_file``, ``data_file`` and ``party_name`` and keeps
    its own fused model at ``<state_dir>/fused.safetensors``; a FedBone client of a built-in suite (which builds
    its own share) needs no data file.

    Args:
        partition_id: this institution's index in the federation.
        state_dir: its state folder (created if needed).
        data_file: its own data file (FedBone features or a PrivFusion party's data), or None.
        model_file: a PrivFusion party's model file, or None.
        party_name: a PrivFusion party's name, or None.
        extra: further node-config keys.

    Raises:
        ConfigError: a negative partition id, only some of a PrivFusion party's three options, or ``extra``
            setting a key that has its own option.
        DataError: a named file does not exist.
    """
    if partition_id < 0:
        raise ConfigError(f"--partition-id: 0 or more, got {partition_id}")
    config: dict[str, Any] = {"partition-id": partition_id, "state-dir": str(Path(state_dir).resolve())}
    files = {"data-file": data_file, "model-file": model_file}
    for key, path in files.items():
        if path is None:
            continue
        if not Path(path).is_file():
            raise DataError(f"{key.replace('-', ' ')} not found (this institution's own {key})", path=path)
        config[key] = str(Path(path).resolve())
    if party_name is not None:
        config["party-name"] = party_name
    if (model_file is None) != (party_name is None) or (model_file is not None and data_file is None):
        raise ConfigError("a PrivFusion party gives --model-file, --data-file and --party-name")
    if model_file is not None:  # the party's own fused model stays with the party
        config["fused-out"] = str(Path(state_dir).resolve() / "fused.safetensors")
    for key, value in (extra or {}).items():
        if key in config:
            raise ConfigError(f"--node-config {key!r} is set by its own option already")
        config[key] = value
    return config


def supernode_args(superlink: Address, *, ca: str | Path | None, private_key: str | Path | None,
                   node_config: Mapping[str, Any], runtime_port: int) -> list[str]:
    """``flower-supernode`` arguments: TLS checked with ``ca`` and authenticated with ``private_key`` (both None:
    the insecure node, for a closed test network only), the node's own config, its local Runtime API port.

    Args:
        superlink: the SuperLink's Fleet API address.
        ca: the CA certificate, or None (insecure).
        private_key: this node's private key, or None (insecure).
        node_config: this node's config (see :func:`institution_node_config`).
        runtime_port: the local port of its ClientApp Runtime API.
    """
    args = ["flower-supernode", "--superlink", str(superlink), "--port", str(runtime_port),
            "--node-config", node_config_text(node_config)]
    if ca is None:
        return [*args, "--insecure"]
    args += ["--root-certificates", str(Path(ca).resolve())]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    return args


def start_supernode(superlink: Address, node_config: Mapping[str, Any], state: str | Path, *,
                    ca: str | Path | None, private_key: str | Path | None, runtime_port: int | None = None,
                    timeout_s: float = 60.0) -> JoinedSuperNode:
    """Start Flower's SuperNode against ``superlink`` and return once the SuperLink accepted it. PluribusError
    (one line) if the SuperLink does not answer, the CA did not sign its certificate, the key is missing or not
    registered, or the node is not accepted within ``timeout_s`` (the SuperNode is then stopped).

    Args:
        superlink: the SuperLink's Fleet API address.
        node_config: this node's config (see :func:`institution_node_config`).
        state: the state folder (log, FLWR_HOME).
        ca: the CA certificate, or None (insecure).
        private_key: this node's private key, or None (insecure).
        runtime_port: the local Runtime API port (default: a free one).
        timeout_s: how long to wait for the SuperLink to accept it.

    Raises:
        ConfigError: only one of ``ca`` and ``private_key`` is given.
        PluribusError: the node is not accepted (see above), or the SuperLink requires TLS and none is given.
    """
    if (ca is None) != (private_key is None):
        raise ConfigError("a secured node gives both --root-certificates and --key (an insecure one neither)")
    if private_key is not None:
        check_private_key(private_key)
    check_superlink(superlink, ca=ca)
    if ca is None:
        _refuse_insecure_to_tls(superlink)
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    log = state / LOG
    start = log_size(log)
    args = supernode_args(superlink, ca=ca, private_key=private_key, node_config=node_config,
                          runtime_port=runtime_port or free_port())
    proc = start_logged(args, log, flower_env(state / HOME))

    def on_exit(code: int) -> str:
        if log_has(log, NOT_REGISTERED, start):
            return (f"the SuperLink at {superlink} refused node key {private_key}: it is not registered there "
                    "(its operator runs `pluribus federation register` with the matching .pub file)")
        last = " ".join(tail(log, 600).split())
        return f"the SuperNode ended (exit {code}) before the SuperLink at {superlink} accepted it; {log}: ...{last[-300:]}"

    try:
        wait_for(proc, lambda: log_has(log, CONNECTED, start), timeout_s, on_exit=on_exit,
                 on_timeout=(f"the SuperLink at {superlink} did not accept this node within {timeout_s:g} s "
                             f"(see {log})"))
    except BaseException:
        stop_processes([proc])
        raise
    return JoinedSuperNode(proc, dict(node_config), log, state)


def _refuse_insecure_to_tls(superlink: Address) -> None:
    """PluribusError if the SuperLink speaks TLS: an insecure node would retry against it for ever."""
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only asks: does it speak TLS at all?
    try:
        with socket.create_connection((superlink.host, superlink.port), timeout=5.0) as sock, \
                context.wrap_socket(sock, server_hostname=superlink.host):
            pass
    except (ssl.SSLError, OSError):
        return
    raise PluribusError(f"the SuperLink at {superlink} requires TLS: join with --root-certificates CA_FILE and "
                        "--key NODE_KEY, not --insecure")
