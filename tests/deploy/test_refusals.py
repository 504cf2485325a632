"""A SuperLink with TLS and SuperNode authentication (Flower's own, started by `pluribus.deploy.host`) refuses
a node whose key is not registered and a node without TLS; bad input to the commands is one line, exit 2,
nothing written. Every process is stopped by its PID; every wait has a deadline."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluribus.cli import main
from pluribus.deploy.address import Address
from pluribus.deploy.certs import make_node_key, make_test_certificates, node_key_paths
from pluribus.deploy.host import HostedSuperLink, register_node, start_superlink
from pluribus.deploy.join import CONNECTED, start_supernode, supernode_args
from pluribus.deploy.processes import flower_env, start_logged
from pluribus.errors import PluribusError
from pluribus.flower_engines import free_port, stop_processes, write_flwr_connection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostedSuperLink, Path]]:
    """A TLS + node-auth SuperLink on loopback; node key 'a' registered, 'b' not."""
    root = tmp_path_factory.mktemp("fed")
    files = make_test_certificates(root / "certs", ["127.0.0.1"], nodes=["a", "b"])
    link = start_superlink(Address("127.0.0.1", free_port()), files, root / "superlink", timeout_s=60)
    try:
        register_node(node_key_paths(root / "certs", "a").public, link.address, ca=files.ca, home=root / "flwr")
        yield link, root
    finally:
        stop_processes([link.process])


def _online_nodes(link: HostedSuperLink, root: Path) -> list[dict[str, object]]:
    """The SuperLink's own list of nodes (Flower's `flwr supernode ls`)."""
    home = root / "ls-home"
    write_flwr_connection(home, str(link.address), root_certificates=root / "certs" / "test-ca.crt")
    done = subprocess.run(["flwr", "supernode", "ls", "federation", "--format", "json"], env=flower_env(home),
                          capture_output=True, text=True, timeout=60, check=True)
    return [n for n in json.loads(done.stdout)["nodes"] if n["status"] == "online"]


def test_unregistered_and_insecure_nodes_are_refused(federation: tuple[HostedSuperLink, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    link, root = federation
    certs = root / "certs"
    ca = certs / "test-ca.crt"
    good = start_supernode(link.address, {"partition-id": 0}, tmp_path / "a", ca=ca,
                           private_key=node_key_paths(certs, "a").private, timeout_s=60)
    try:
        with pytest.raises(PluribusError, match="refused node key .*not registered"):
            start_supernode(link.address, {"partition-id": 1}, tmp_path / "b", ca=ca,
                            private_key=node_key_paths(certs, "b").private, timeout_s=60)
        with pytest.raises(PluribusError, match="requires TLS"):
            start_supernode(link.address, {"partition-id": 2}, tmp_path / "c", ca=None, private_key=None)
        # Flower's own insecure SuperNode, past pluribus's check: the SuperLink never accepts it
        log = tmp_path / "insecure.log"
        raw = start_logged(supernode_args(link.address, ca=None, private_key=None, node_config={"partition-id": 3},
                                          runtime_port=free_port()), log, flower_env(tmp_path / "raw-home"))
        try:
            time.sleep(8)
            assert CONNECTED not in log.read_text(errors="replace")
            assert raw.poll() is None  # still knocking at a door that does not open
        finally:
            stop_processes([raw])
        online = _online_nodes(link, root)
        assert len(online) == 1, online  # only the registered, authenticated node
        # the same refusals through the command: one line, exit 2
        assert main(["federation", "join", "--superlink", str(link.address), "--root-certificates", str(ca),
                     "--key", str(node_key_paths(certs, "b").private), "--state-dir", str(tmp_path / "b2"),
                     "--partition-id", "1"]) == 2
        err = capsys.readouterr().err
        assert "not registered" in err and len(err.strip().splitlines()) == 1, err
        # a run the federation cannot do (its one node holds no party files): one line, exit 2, a reason
        assert main(["fuse", "flower", "--superlink", str(link.address), "--root-certificates", str(ca),
                     "--parties", "2", "--step-timeout", "5", "--timeout", "240",
                     "--out", str(tmp_path / "runs" / "fused")]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "ended without a result" in errors[0] and "at least 2 parties" in errors[0], errors
        assert not (tmp_path / "runs" / "fused" / "fused.safetensors").exists()
    finally:
        stop_processes([good.process])


def _expired_ca(path: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired test CA")])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(past).not_valid_after(past + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA384()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_bad_input_is_one_line_exit_2_nothing_written(federation: tuple[HostedSuperLink, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    link, root = federation
    certs = root / "certs"
    ca = str(certs / "test-ca.crt")
    other = make_test_certificates(tmp_path / "other", [])
    key = make_node_key(tmp_path / "keys", "z")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{s.getsockname()[1]}"
        join = ["federation", "join", "--state-dir", str(tmp_path / "state"), "--partition-id", "0",
                "--key", str(node_key_paths(certs, "a").private)]
        cases = {
            "does not answer": join + ["--superlink", silent, "--root-certificates", ca],
            "does not vouch for": join + ["--superlink", str(link.address), "--root-certificates", str(other.ca)],
            "expired on": join + ["--superlink", str(link.address), "--root-certificates",
                                  str(_expired_ca(tmp_path / "expired.crt"))],
            "node private key not found": ["federation", "join", "--superlink", str(link.address),
                                           "--root-certificates", ca, "--key", str(tmp_path / "no.key"),
                                           "--state-dir", str(tmp_path / "state"), "--partition-id", "0"],
            "data file not found": join + ["--superlink", str(link.address), "--root-certificates", ca,
                                           "--data-file", str(tmp_path / "none.safetensors")],
            "not loopback": ["federation", "register", str(key.public), "--superlink", "10.255.0.1:9093"],
            "node public key not found": ["federation", "register", str(tmp_path / "no.pub"), "--superlink",
                                          str(link.address), "--root-certificates", ca],
            "fuse-silent": ["fuse", "flower", "--superlink", silent, "--root-certificates", ca, "--parties", "2",
                            "--noise-seed", "1", "--out", str(tmp_path / "runs" / "fused")],
            "fuse-parties": ["fuse", "flower", "--superlink", str(link.address), "--root-certificates", ca,
                             "--parties", "1", "--out", str(tmp_path / "runs" / "fused")],
            "fed-silent": ["fed", "flower", "--config", str(tmp_path / "none.toml"), "--superlink", silent],
        }
        expect = {"fuse-silent": "does not answer", "fuse-parties": "--parties", "fed-silent": "none.toml"}
        for what, argv in cases.items():
            assert main(argv) == 2, what
            errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and expect.get(what, what) in errors[0], (what, errors)
    assert not (tmp_path / "state").exists() and not (tmp_path / "runs").exists()  # nothing half-written
