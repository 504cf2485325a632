"""Addresses and the preflight that names a SuperLink that does not answer or a CA that does not fit it."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pluribus.deploy.address import Address, check_superlink, choose_tls, parse_address
from pluribus.deploy.certs import make_test_certificates
from pluribus.errors import ConfigError, PluribusError


def test_parse_address() -> None:
    assert parse_address("10.0.0.1:9093") == Address("10.0.0.1", 9093)
    assert parse_address("[::1]:9093") == Address("::1", 9093) and str(Address("::1", 9093)) == "[::1]:9093"
    assert parse_address("localhost:1").loopback and parse_address("127.0.0.9:1").loopback
    assert not parse_address("fl.example.org:443").loopback
    for bad in ("10.0.0.1", "10.0.0.1:x", "10.0.0.1:70000", ":9093", "::1:9093"):
        with pytest.raises(ConfigError, match="expected HOST:PORT"):
            parse_address(bad)


def test_tls_is_the_default_off_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = make_test_certificates(tmp_path / "c", [])
    remote = Address("10.9.0.1", 9093)
    with pytest.raises(ConfigError, match="not loopback: give --root-certificates"):
        choose_tls(remote, None, insecure=False)
    assert choose_tls(remote, files.ca, insecure=False) == files.ca
    assert capsys.readouterr().err == ""
    assert choose_tls(remote, None, insecure=True) is None
    assert "NOT encrypted" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not both"):
        choose_tls(remote, files.ca, insecure=True)


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[tuple[Address, Path]]:
    """A TLS listener on loopback with the test SuperLink certificate (accepts and completes handshakes)."""
    files = make_test_certificates(tmp_path / "certs", [])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Address("127.0.0.1", server.getsockname()[1]), files.ca
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_check_superlink(tls_server: tuple[Address, Path], tmp_path: Path) -> None:
    address, ca = tls_server
    check_superlink(address, ca=ca)
    other = make_test_certificates(tmp_path / "other", [])
    with pytest.raises(PluribusError, match="does not vouch for"):
        check_superlink(address, ca=other.ca)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = Address("127.0.0.1", s.getsockname()[1])  # bound, not listening: refused
        with pytest.raises(PluribusError, match=r"does not answer \(Connection refused\)"):
            check_superlink(closed, ca=ca)
