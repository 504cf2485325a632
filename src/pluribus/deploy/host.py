"""Host a federation: Flower's SuperLink with TLS and SuperNode authentication on a chosen address, and the
registration of each institution's node key with Flower's own ``flwr supernode register``.

The SuperLink keeps its state (registered nodes, runs) in ``<state>/superlink.db``, so a restarted SuperLink
still knows the registered nodes; Flower's installed apps go to ``<state>/flwr-home``; its log to
``<state>/superlink.log``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pluribus.deploy.address import Address, check_superlink
from pluribus.deploy.certs import ServerFiles, check_ca_certificate, check_public_key
from pluribus.deploy.processes import flower_env, log_has, log_size, start_logged, wait_for
from pluribus.errors import ConfigError, DataError, PluribusError
from pluribus.flower_engines import tail, write_flwr_connection

DATABASE, LOG, HOME = "superlink.db", "superlink.log", "flwr-home"


@dataclass(frozen=True)
class HostedSuperLink:
    """A SuperLink this process started: its process, address, log and state folder.

    Attributes:
        process: the ``flower-superlink`` process.
        address: where it listens (Fleet API).
        log: its log file.
        state: its state folder.
    """

    process: subprocess.Popen[bytes]
    address: Address
    log: Path
    state: Path


def check_server_files(server: ServerFiles) -> None:
    """DataError naming the first missing or unusable TLS file of the SuperLink.

    Args:
        server: the SuperLink's TLS files.

    Raises:
        DataError: a file is missing or unusable.
    """
    check_ca_certificate(server.ca)
    for what, path in (("server certificate", server.cert), ("server private key", server.key)):
        if not Path(path).is_file():
            raise DataError(f"{what} not found", path=path)


def superlink_args(address: Address, server: ServerFiles | None, state: Path) -> list[str]:
    """``flower-superlink`` arguments: TLS with the server files and SuperNode authentication on (None: the
    insecure SuperLink, which cannot authenticate nodes), state in ``state``, apps' dependencies never
    installed at run time (every host runs the pluribus it has).

    Args:
        address: the Fleet API address to listen on.
        server: the TLS files, or None for an insecure SuperLink.
        state: the state folder.
    """
    args = ["flower-superlink", "--host", address.host, "--port", str(address.port), "--database",
            str(state / DATABASE), "--disable-runtime-dependency-installation"]
    if server is None:
        return [*args, "--insecure"]
    return [*args, "--ssl-ca-certfile", str(Path(server.ca).resolve()), "--ssl-certfile",
            str(Path(server.cert).resolve()), "--ssl-keyfile", str(Path(server.key).resolve()),
            "--enable-supernode-auth"]


def start_superlink(address: Address, server: ServerFiles | None, state: str | Path, *,
                    timeout_s: float = 60.0) -> HostedSuperLink:
    """Start Flower's SuperLink on ``address`` and return once it answers there (over TLS checked with the
    CA when ``server`` is given); PluribusError naming the cause (a port in use, a bad certificate) if it ends
    or does not answer within ``timeout_s``.

    Args:
        address: the Fleet API address to listen on.
        server: the TLS files, or None for an insecure SuperLink.
        state: the state folder (created if needed).
        timeout_s: how long to wait for it to answer.

    Raises:
        PluribusError: it exits or does not answer in time (naming the cause from its log).
        DataError: a TLS file is missing or unusable.
    """
    if server is not None:
        check_server_files(server)
    state = Path(state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    log = state / LOG
    start = log_size(log)
    proc = start_logged(superlink_args(address, server, state), log, flower_env(state / HOME))
    running = f"Uvicorn running on {'https' if server else 'http'}://"

    def on_exit(code: int) -> str:
        last = " ".join(tail(log, 600).split())
        return f"the SuperLink did not start on {address} (exit {code}); {log}: ...{last[-300:]}"

    try:
        wait_for(proc, lambda: log_has(log, running, start), timeout_s, on_exit=on_exit,
                 on_timeout=f"the SuperLink did not answer on {address} within {timeout_s:g} s; see {log}")
        check_superlink(address.reachable, ca=None if server is None else server.ca)
    except BaseException:
        from pluribus.flower_engines import stop_processes

        stop_processes([proc])
        raise
    return HostedSuperLink(proc, address, log, state)


def register_node(public_key: str | Path, address: Address, *, ca: str | Path | None, home: str | Path | None = None,
                  name: str | None = None, timeout_s: float = 60.0) -> int:
    """Register a SuperNode's public key with the SuperLink at ``address`` through its Control API (Flower's
    ``flwr supernode register``); returns the node id. ``home``: a FLWR_HOME folder to keep the connection in
    (default: a temporary one). PluribusError (one line) for a missing or invalid key, a SuperLink that does not
    answer, a refused key.

    Args:
        public_key: the SuperNode's public key file (OpenSSH).
        address: the SuperLink's Control API address.
        ca: the CA certificate to reach it over TLS, or None (plain, loopback only).
        home: a FLWR_HOME folder to keep the connection in (default: a temporary one).
        name: the node's name, shown in messages (default: the key file's name).
        timeout_s: how long to wait for the answer.

    Raises:
        ConfigError: the SuperLink answered without a node id.
        PluribusError: the key is missing or invalid, the SuperLink does not answer or refuses the key.
    """
    public_key = Path(public_key)
    check_public_key(public_key)
    check_superlink(address, ca=ca)
    if home is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="flwr-register-") as tmp:
            return register_node(public_key, address, ca=ca, home=tmp, name=name, timeout_s=timeout_s)
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    write_flwr_connection(home, str(address), root_certificates=ca)
    args = ["flwr", "supernode", "register", str(public_key.resolve()), "federation", "--format", "json"]
    if name is not None:
        args += ["--name", name]
    try:
        done = subprocess.run(args, env=flower_env(home), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise PluribusError(f"`flwr supernode register` got no answer from {address} within {timeout_s:g} s") from None
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        why = reply.get("error-message") or " ".join((done.stderr or done.stdout).split())[-300:]
        raise PluribusError(f"the SuperLink at {address} did not register {public_key}: {why}")
    try:
        return int(reply["node-id"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"`flwr supernode register` answered without a node id: {reply}") from None
