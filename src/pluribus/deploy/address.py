"""SuperLink addresses: parsing ``host:port``, whether TLS is required, and a bounded check that it answers.

The check (:func:`check_superlink`) opens one TCP connection and, with a CA certificate, one TLS handshake
against it, both under a timeout: so a wrong address, a SuperLink that is not running and a CA that did not
sign the SuperLink's certificate are each one line naming what is wrong, before any Flower process starts.
Flower's own binaries carry all the federation's traffic; this only looks before they do.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from pluribus.errors import ConfigError, PluribusError

INSECURE_WARNING = ("warning: --insecure: traffic to and from {address} is NOT encrypted and any node may join; "
                    "use it only on a closed test network")


@dataclass(frozen=True)
class Address:
    """A ``host:port`` address (IPv6 hosts in brackets when written).

    Attributes:
        host: a host name, IPv4 or IPv6 address (without brackets).
        port: the TCP port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def reachable(self) -> Address:
        """Where a client on this host reaches a server bound to this address (0.0.0.0 / :: -> loopback)."""
        return {"0.0.0.0": Address("127.0.0.1", self.port), "::": Address("::1", self.port)}.get(self.host, self)

    @property
    def loopback(self) -> bool:
        """Whether the address stays on this machine (127.0.0.0/8, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str, *, option: str = "--superlink") -> Address:
    """``host:port`` (or ``[v6]:port``) as an :class:`Address`; ConfigError naming ``option`` otherwise.

    Args:
        text: ``host:port`` or ``[v6]:port``.
        option: the command-line option it came from (named in the error).

    Raises:
        ConfigError: not a ``host:port`` with a port in 1..65535.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and not text.startswith("[")):
        raise ConfigError(f"{option} {text!r}: expected HOST:PORT (an IPv6 host in brackets: [::1]:9093)")
    return Address(host, int(port))


def choose_tls(address: Address, ca: str | Path | None, *, insecure: bool) -> Path | None:
    """The CA certificate to reach ``address`` with (None: plain HTTP). TLS is required for an address that is
    not loopback unless ``insecure``; ``insecure`` (or loopback without a CA) prints a warning on stderr.

    Args:
        address: the address to reach.
        ca: the CA certificate, or None.
        insecure: allow plain HTTP off loopback (with a warning).

    Raises:
        ConfigError: ``address`` is not loopback, no ``ca`` is given and ``insecure`` is not set.
    """
    if insecure and ca is not None:
        raise ConfigError("give --root-certificates (TLS) or --insecure, not both")
    if ca is None and not insecure and not address.loopback:
        raise ConfigError(f"--superlink {address} is not loopback: give --root-certificates CA_FILE (TLS; the "
                          "default) or --insecure (unencrypted, only on a closed test network)")
    if ca is None:
        print(INSECURE_WARNING.format(address=address), file=sys.stderr)
        return None
    from pluribus.deploy.certs import check_ca_certificate

    check_ca_certificate(ca)
    return Path(ca)


def check_superlink(address: Address, *, ca: str | Path | None, timeout_s: float = 5.0) -> None:
    """PluribusError (one line) unless something answers at ``address`` and, with ``ca``, completes a TLS
    handshake with a certificate that ``ca`` signed for that host name or IP.

    Args:
        address: where the SuperLink should answer.
        ca: the CA certificate to check its TLS certificate with, or None (a plain TCP connect).
        timeout_s: how long to try.

    Raises:
        PluribusError: nothing answers, or the TLS handshake fails (one line saying why).
    """
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PluribusError(f"the SuperLink at {address} does not answer ({reason}); is it running and is "
                            "the address right?") from None
    with sock:
        if ca is None:
            return
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=address.host) as tls:
                tls.settimeout(timeout_s)
        except ssl.SSLCertVerificationError as err:
            raise PluribusError(f"the SuperLink at {address} presents a certificate that {ca} does not vouch for "
                                f"({err.verify_message}): wrong CA certificate, or the server certificate lacks "
                                f"{address.host} in its names") from None
        except (ssl.SSLError, OSError) as err:
            raise PluribusError(f"no TLS handshake with the SuperLink at {address} ({err}); does it run with "
                                "TLS (is it an --insecure SuperLink)?") from None
