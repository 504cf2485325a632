"""The test CA helper: what Flower's binaries read, labelled NOT FOR PRODUCTION, written all or nothing."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest

from pluribus.deploy.certs import (
    README,
    check_ca_certificate,
    check_private_key,
    check_public_key,
    make_node_key,
    make_test_certificates,
    node_key_paths,
)
from pluribus.errors import ConfigError, DataError


def test_certificates_are_what_flower_reads(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    files = make_test_certificates(tmp_path / "certs", ["10.77.0.1", "fl.example.org"], nodes=["a", "b"])
    assert "NOT FOR PRODUCTION" in (tmp_path / "certs" / README).read_text()
    assert all("test" in p.name for p in (files.ca, files.cert, files.key))
    server = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.77.0.1"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert set(names.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert "NOT FOR PRODUCTION" in server.subject.rfc4514_string()
    check_ca_certificate(files.ca)
    for name in ("a", "b"):
        key = node_key_paths(tmp_path / "certs", name)
        private = load_ssh_private_key(key.private.read_bytes(), None)  # what flower-supernode runs
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(key.public)
        assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


def test_nothing_is_overwritten_and_bad_input_writes_nothing(tmp_path: Path) -> None:
    make_test_certificates(tmp_path / "certs", [])
    with pytest.raises(ConfigError, match="already exists"):
        make_test_certificates(tmp_path / "certs", [])
    with pytest.raises(ConfigError, match="not an IP address or a DNS name"):
        make_test_certificates(tmp_path / "other", ["bad host!"])
    with pytest.raises(ConfigError, match="node name"):
        make_test_certificates(tmp_path / "other", [], nodes=["../escape"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs"]  # no half-written folder
    key = make_node_key(tmp_path / "keys", "hospital-a")
    with pytest.raises(ConfigError, match="never overwritten"):
        make_node_key(tmp_path / "keys", "hospital-a")
    check_private_key(key.private)
    check_public_key(key.public)


def test_an_expired_or_wrong_ca_certificate_is_one_line(tmp_path: Path) -> None:
    files = make_test_certificates(tmp_path / "certs", [], days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with pytest.raises(DataError, match="expired on"):
        check_ca_certificate(files.ca, now=later)
    with pytest.raises(DataError, match="not a CA certificate"):
        check_ca_certificate(files.cert)
    with pytest.raises(DataError, match="not a PEM certificate"):
        check_ca_certificate(files.key)
    with pytest.raises(DataError, match="CA certificate not found"):
        check_ca_certificate(tmp_path / "nope.crt")
    with pytest.raises(DataError, match="not an unencrypted OpenSSH private key"):
        check_private_key(files.key)  # a PKCS8 server key, not a node key
    with pytest.raises(DataError, match="not an OpenSSH public key"):
        check_public_key(files.ca)
