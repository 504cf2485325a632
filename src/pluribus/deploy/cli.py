"""`pluribus federation`: host a secured federation or join one from an institution's own host.

``certs`` (a test CA, SuperLink certificate and node keys: NOT FOR PRODUCTION), ``node-key`` (an institution's
own key pair), ``host`` (Flower's SuperLink with TLS and SuperNode authentication, in the foreground),
``register`` (a node's public key, through Flower's ``flwr supernode register``) and ``join`` (Flower's
SuperNode with this institution's own files, in the foreground). Runs are submitted with ``pluribus fed flower``
or ``pluribus fuse flower`` and ``--superlink``. docs/deploy.md walks through it host by host.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

app = typer.Typer(help="Host a secured federation (SuperLink) or join one (SuperNode) on Flower.",
                  no_args_is_help=True)

CA_HELP = "The federation's CA certificate (PEM): checks the SuperLink's TLS certificate."
INSECURE_HELP = "No TLS and no node authentication (a closed test network only; prints a warning)."


@app.command()
def certs(
    out: Path = typer.Option(..., help="New folder for the test CA, the SuperLink certificate and node keys."),
    host: list[str] = typer.Option([], "--host", help="A host name or IP the SuperLink is reached at (repeat); "
                                                      "127.0.0.1 and localhost are always included."),
    node: list[str] = typer.Option([], "--node", help="Make a key pair for this node name (repeat)."),
    days: int = typer.Option(30, help="Days the certificates are valid."),
) -> None:
    """Make a TEST CA, a SuperLink server certificate and node key pairs (NOT FOR PRODUCTION: docs/deploy.md)."""
    from pluribus.deploy.certs import README, make_test_certificates

    files = make_test_certificates(out, host, nodes=node, days=days)
    typer.echo(f"wrote {files.ca}, {files.cert}, {files.key} and {len(node)} node key pairs in {out}")
    typer.echo(f"NOT FOR PRODUCTION: see {out / README}", err=True)


@app.command("node-key")
def node_key(
    out: Path = typer.Option(..., help="Folder for the key pair (the private key never leaves this host)."),
    name: str = typer.Option(..., help="This node's name (letters, digits, '.', '_', '-')."),
) -> None:
    """Make this institution's SuperNode key pair (P-384); send only the .pub file to the federation's operator."""
    from pluribus.deploy.certs import make_node_key

    key = make_node_key(out, name)
    typer.echo(f"wrote {key.private} (keep it on this host) and {key.public} (send it to the operator)")


@app.command()
def host(
    address: str = typer.Option(..., help="HOST:PORT the SuperLink listens on (SuperNodes and `flwr` connect here)."),
    state_dir: Path = typer.Option(..., help="The SuperLink's state: registered nodes and runs (superlink.db), "
                                             "its log and Flower's installed apps; a restart keeps them."),
    certs_dir: Path | None = typer.Option(None, "--certs", help="A folder from `federation certs` (test-ca.crt, "
                                                                "test-superlink.crt/.key)."),
    ca: Path | None = typer.Option(None, "--ssl-ca-certfile", help="CA certificate (instead of --certs)."),
    cert: Path | None = typer.Option(None, "--ssl-certfile", help="SuperLink certificate (instead of --certs)."),
    key: Path | None = typer.Option(None, "--ssl-keyfile", help="SuperLink private key (instead of --certs)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    timeout: float = typer.Option(60.0, help="Seconds the SuperLink may take to answer."),
) -> None:
    """Run Flower's SuperLink with TLS and SuperNode authentication until stopped (Ctrl-C or SIGTERM)."""
    from pluribus.deploy.address import INSECURE_WARNING, parse_address
    from pluribus.deploy.certs import ServerFiles, server_files
    from pluribus.deploy.host import start_superlink
    from pluribus.deploy.processes import serve_until_stopped
    from pluribus.errors import ConfigError

    addr = parse_address(address, option="--address")
    given = [p for p in (ca, cert, key) if p is not None]
    if insecure and (certs_dir is not None or given):
        raise ConfigError("give the TLS files (--certs or --ssl-*) or --insecure, not both")
    if certs_dir is not None and given:
        raise ConfigError("give --certs DIR or the three --ssl-* files, not both")
    if not insecure and certs_dir is None and len(given) != 3:
        raise ConfigError("TLS needs --certs DIR or all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile "
                          "(or --insecure on a closed test network)")
    server = None
    if certs_dir is not None:
        server = server_files(certs_dir)
    elif not insecure:
        assert ca is not None and cert is not None and key is not None
        server = ServerFiles(ca, cert, key)
    if server is None:
        typer.echo(INSECURE_WARNING.format(address=addr), err=True)
    link = start_superlink(addr, server, state_dir, timeout_s=timeout)
    auth = "TLS, SuperNode authentication on" if server is not None else "INSECURE"
    typer.echo(f"SuperLink on {addr} ({auth}), flower-superlink pid {link.process.pid}, log {link.log}; stop "
               f"with Ctrl-C or kill {os.getpid()}", err=True)
    serve_until_stopped([link.process], what="the SuperLink", log=link.log)


@app.command()
def register(
    public_key: Path = typer.Argument(..., help="The node's public key (.pub, from `federation node-key`)."),
    superlink: str = typer.Option(..., help="HOST:PORT of the SuperLink."),
    root_certificates: Path | None = typer.Option(None, help=CA_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    name: str | None = typer.Option(None, help="A name for the node in `flwr supernode ls`."),
    flwr_home: Path | None = typer.Option(None, help="Keep Flower's connection config (FLWR_HOME) here, e.g. for "
                                                     "`flwr supernode ls` later (default: a temporary folder)."),
) -> None:
    """Register a SuperNode's public key with the SuperLink (Flower's `flwr supernode register`)."""
    from pluribus.deploy.address import choose_tls, parse_address
    from pluribus.deploy.host import register_node

    addr = parse_address(superlink)
    ca = choose_tls(addr, root_certificates, insecure=insecure)
    node_id = register_node(public_key, addr, ca=ca, home=flwr_home, name=name)
    typer.echo(f"registered {public_key} as node {node_id}")


@app.command()
def join(
    superlink: str = typer.Option(..., help="HOST:PORT of the federation's SuperLink."),
    state_dir: Path = typer.Option(..., help="This node's own state folder (checkpoints, odometer, logs)."),
    partition_id: int = typer.Option(..., help="This institution's index in the federation (0, 1, ...)."),
    data_file: Path | None = typer.Option(None, help="This institution's own data file (only this one is read; "
                                                     "a FedBone client of a built-in suite has none)."),
    root_certificates: Path | None = typer.Option(None, help=CA_HELP),
    key: Path | None = typer.Option(None, help="This node's private key (registered by the operator)."),
    model_file: Path | None = typer.Option(None, help="PrivFusion: this party's model file."),
    party_name: str | None = typer.Option(None, help="PrivFusion: this party's name."),
    node_config: list[str] = typer.Option([], help="More node config, KEY=VALUE (repeat), e.g. worker=auto."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    timeout: float = typer.Option(60.0, help="Seconds the SuperLink may take to accept this node."),
) -> None:
    """Run this institution's Flower SuperNode with its own files until stopped (Ctrl-C or SIGTERM)."""
    from pluribus.deploy.address import choose_tls, parse_address
    from pluribus.deploy.join import institution_node_config, start_supernode
    from pluribus.deploy.processes import serve_until_stopped
    from pluribus.errors import ConfigError

    addr = parse_address(superlink)
    extra: dict[str, str | int | float | bool] = {}
    for item in node_config:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(f"--node-config {item!r}: expected KEY=VALUE")
        try:  # numbers and true/false as such, anything else a string
            value = json.loads(v)
        except ValueError:
            value = v
        extra[k] = value if isinstance(value, bool | int | float | str) else v
    config = institution_node_config(partition_id=partition_id, state_dir=state_dir, data_file=data_file,
                                     model_file=model_file, party_name=party_name, extra=extra)
    if insecure and (key is not None or root_certificates is not None):
        raise ConfigError("give --root-certificates and --key (TLS) or --insecure, not both")
    if not insecure and (key is None or root_certificates is None):
        raise ConfigError("a secured node needs --root-certificates (the federation's CA) and --key (its private "
                          "key, registered by the operator); --insecure only on a closed test network")
    ca = choose_tls(addr, root_certificates, insecure=insecure)
    node = start_supernode(addr, config, state_dir, ca=ca, private_key=key, timeout_s=timeout)
    typer.echo(f"joined {addr} as partition {partition_id} ({data_file or 'no data file'}), flower-supernode pid "
               f"{node.process.pid}, log {node.log}; stop with Ctrl-C or kill {os.getpid()}", err=True)
    serve_until_stopped([node.process], what="the SuperNode", log=node.log)
