"""Test certificates for trying a secured federation: a CA, a SuperLink server certificate, node key pairs.

Everything here is for trying it out (one machine, a lab, a namespace test): the CA's private key sits in
the same folder as what it signs and nothing is revoked or rotated. Every file name says ``test`` and the
folder gets ``NOT-FOR-PRODUCTION.md``; docs/deploy.md says what a real deployment uses instead.

- **CA** (``test-ca.crt``; key ``test-ca.key``): the root certificate every host is given to check the SuperLink;
- **SuperLink** (``test-superlink.crt`` / ``.key``): a server certificate with a SAN for every host name and IP
  the SuperLink is reached at (plus 127.0.0.1 and localhost: the SuperLink's own ServerApp runner connects there);
- **nodes** (``node-<name>.key`` / ``.pub``): one P-384 EC key pair per SuperNode in OpenSSH format, what
  ``flower-supernode --auth-supernode-private-key`` reads and ``flwr supernode register`` takes. Made here they
  are test keys (made on one host, beside the CA); :func:`make_node_key` makes an institution's real key on its
  own host.

Files are written all or nothing: into a fresh temporary folder renamed into place; private keys are 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pluribus.errors import ConfigError, DataError

CA_CERT, CA_KEY = "test-ca.crt", "test-ca.key"
SERVER_CERT, SERVER_KEY = "test-superlink.crt", "test-superlink.key"
README = "NOT-FOR-PRODUCTION.md"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
LOCAL_NAMES = ("127.0.0.1", "localhost")
LABEL = "pluribus TEST certificate - NOT FOR PRODUCTION"
README_TEXT = """# NOT FOR PRODUCTION

These files were made by `pluribus federation certs` for **trying out** a secured federation.

- `test-ca.key` signs everything here and sits beside what it signs: anyone with this folder can mint a
  certificate the SuperLink's clients will trust.
- Nothing here is revoked, rotated or kept in a hardware module; the node keys (`node-*.key`) were made on one
  machine, not on each institution's own host.

A real deployment uses certificates from the organisation's own CA (or a public CA for a public host name),
the SuperLink's key only on the SuperLink host, and a node key made on each institution's host by that
institution (`pluribus federation node-key`), of which only the public half is sent to the federation's
operator. See docs/deploy.md.
"""


@dataclass(frozen=True)
class ServerFiles:
    """The files a SuperLink serves TLS with: CA certificate, its server certificate and its private key.

    Attributes:
        ca: the CA certificate (PEM), given to every SuperNode.
        cert: the SuperLink's certificate (PEM).
        key: the SuperLink's private key (PEM).
    """

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair: the private key stays on its host, the public key is registered.

    Attributes:
        name: the node's name.
        private: the private key file (OpenSSH).
        public: the public key file (OpenSSH).
    """

    name: str
    private: Path
    public: Path


def node_key_paths(folder: str | Path, name: str) -> NodeKey:
    """Where ``name``'s key pair lives in ``folder`` (``node-<name>.key`` / ``.pub``).

    Args:
        folder: the folder holding the keys.
        name: the node's name.
    """
    check_node_name(name)
    return NodeKey(name, Path(folder) / f"node-{name}.key", Path(folder) / f"node-{name}.pub")


def server_files(folder: str | Path) -> ServerFiles:
    """The SuperLink's files in a folder written by :func:`make_test_certificates`.

    Args:
        folder: the folder :func:`make_test_certificates` wrote.
    """
    folder = Path(folder)
    return ServerFiles(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)


def check_node_name(name: str) -> None:
    """ConfigError unless ``name`` is a plain node name (letters, digits, '.', '_', '-'; at most 63).

    Args:
        name: the node name to check.

    Raises:
        ConfigError: the name is empty, too long or holds other characters.
    """
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"node name {name!r}: use letters, digits, '.', '_' or '-' (at most 63, no leading "
                          "punctuation)")


def _san_entries(hosts: list[str]) -> list[object]:
    from cryptography import x509

    entries: list[object] = []
    seen: set[str] = set()
    for host in [*hosts, *LOCAL_NAMES]:
        host = host.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise ConfigError(f"--host {host!r}: not an IP address or a DNS name") from None
            entries.append(x509.DNSName(host))
    return entries


def _name(common: str) -> object:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, LABEL),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _private_pem(key: object, *, openssh: bool = False) -> bytes:
    from cryptography.hazmat.primitives import serialization

    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())  # type: ignore[attr-defined]


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _node_key_bytes() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _private_pem(key, openssh=True), public + b"\n"


def make_test_certificates(out: str | Path, hosts: list[str], *, nodes: list[str] | None = None,
                           days: int = 30) -> ServerFiles:
    """Write a test CA, a SuperLink certificate valid for ``hosts`` (and loopback) and a key pair per name in
    ``nodes`` into the new folder ``out``; ConfigError if ``out`` already exists (nothing is overwritten).

    Args:
        out: the folder to create.
        hosts: the SuperLink's host names or IP addresses (its certificate's subject alternative names).
        nodes: names of SuperNodes to make key pairs for.
        days: how long the certificates are valid.

    Raises:
        ConfigError: ``out`` exists, ``days`` is outside 1..3650, or a node name is invalid or repeated.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; certificates go into a new folder (remove it or pick another)")
    if not 1 <= days <= 3650:
        raise ConfigError(f"--days: between 1 and 3650, got {days}")
    for name in nodes or []:
        check_node_name(name)
    if len(set(nodes or [])) != len(nodes or []):
        raise ConfigError(f"--node: names must be unique, got {nodes}")
    san = _san_entries(hosts)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # a little slack for clocks a few minutes apart
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("pluribus test CA (NOT FOR PRODUCTION)")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())  # type: ignore[arg-type]
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name("pluribus test SuperLink (NOT FOR PRODUCTION)"))  # type: ignore[arg-type]
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName(san), critical=False)  # type: ignore[arg-type]
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp / README, README_TEXT.encode())
        _write(tmp / CA_CERT, ca.public_bytes(pem))
        _write(tmp / CA_KEY, _private_pem(ca_key), private=True)
        _write(tmp / SERVER_CERT, server.public_bytes(pem))
        _write(tmp / SERVER_KEY, _private_pem(server_key), private=True)
        for name in nodes or []:
            private, public = _node_key_bytes()
            paths = node_key_paths(tmp, name)
            _write(paths.private, private, private=True)
            _write(paths.public, public)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return server_files(out)


def make_node_key(folder: str | Path, name: str) -> NodeKey:
    """Write one SuperNode key pair (P-384, OpenSSH format) into ``folder``; ConfigError if either file exists.
    An institution runs this on its own host and sends only the ``.pub`` file to the federation's operator.

    Args:
        folder: the folder to write into (created if needed).
        name: the node's name.

    Raises:
        ConfigError: an invalid name, or the key files exist already.
    """
    paths = node_key_paths(folder, name)
    for p in (paths.private, paths.public):
        if p.exists():
            raise ConfigError(f"{p}: already exists; a node key is never overwritten (remove it to make a new one)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    private, public = _node_key_bytes()
    try:
        _write(paths.public, public)
        _write(paths.private, private, private=True)
    except BaseException:
        for p in (paths.private, paths.public):
            p.unlink(missing_ok=True)
        raise
    return paths


def check_ca_certificate(path: str | Path, *, now: dt.datetime | None = None) -> None:
    """DataError unless ``path`` is a readable PEM CA certificate that is valid now (one line saying which).

    Args:
        path: the CA certificate file.
        now: the time to check validity at (default: now, UTC).

    Raises:
        DataError: missing, not PEM, not a CA, not yet valid or expired.
    """
    from cryptography import x509

    path = Path(path)
    if not path.is_file():
        raise DataError("CA certificate not found", path=path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise DataError(f"not a PEM certificate ({err})", path=path, expected="the federation's CA certificate") from None
    when = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < when:
        raise DataError(f"CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", path=path)
    if cert.not_valid_before_utc > when:
        raise DataError(f"CA certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                        "(is this host's clock right?)", path=path)
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise DataError("this certificate is not a CA certificate (a server's own certificate?)", path=path,
                        expected="the CA certificate that signed the SuperLink's certificate")


def check_private_key(path: str | Path) -> None:
    """DataError unless ``path`` is an OpenSSH EC private key on a NIST curve (what flower-supernode reads).

    Args:
        path: the private key file.

    Raises:
        DataError: missing, unreadable, or not an EC key on a NIST curve in OpenSSH format.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path)
    if not path.is_file():
        raise DataError("node private key not found", path=path)
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DataError(f"not an unencrypted OpenSSH private key ({err})", path=path,
                        expected="a key made by `pluribus federation node-key`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DataError(f"a {type(key).__name__}, not an EC key", path=path, expected="a P-384 EC key")


def check_public_key(path: str | Path) -> None:
    """DataError unless ``path`` is an OpenSSH EC public key on a NIST curve (what ``flwr supernode register``
    takes).

    Args:
        path: the public key file.

    Raises:
        DataError: missing, unreadable, or not an EC key on a NIST curve in OpenSSH format.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = Path(path)
    if not path.is_file():
        raise DataError("node public key not found", path=path)
    try:
        key = load_ssh_public_key(path.read_bytes().strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as err:
        raise DataError(f"not an OpenSSH public key ({err})", path=path,
                        expected="the .pub file made by `pluribus federation node-key`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DataError(f"a {type(key).__name__}, not an EC key", path=path, expected="a P-384 EC public key")
