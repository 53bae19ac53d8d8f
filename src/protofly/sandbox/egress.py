"""Egress endpoints: what a stub's descriptor says it may connect to (its signed ``egress`` field).

A stub runs in a network namespace of its own, with no interface but its own loopback, so it reaches
nothing by itself.  Its descriptor lists the endpoints it needs, e.g. ``["ws://node.b.test:443/ws",
"tcp://xmpp.c.test:5222"]``; the runtime's side of the sandbox opens those connections for it and hands
over the connected socket (:mod:`protofly.sandbox.broker`).  This module is the one model of such an
endpoint: the catalogue validates the descriptor field with it, the broker matches a stub's request
against it.

An endpoint is a URL with a scheme (``ws``, ``wss``, ``http``, ``https``, ``tcp``, ``tls``), a host (a
name or an IP literal, IPv6 in brackets) and a port, explicit or the scheme's default (``tcp`` and ``tls``
have none, so theirs must be written).  A request matches a declared endpoint when scheme, host and port
are equal; the path is not part of the match, since the stub owns every byte on the connection it gets.

Kept to the standard library: the sandbox host imports it in every stub process.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_PORTS",
    "MAX_ENDPOINTS",
    "Endpoint",
    "EndpointError",
    "parse_egress",
    "parse_endpoint",
]

#: The schemes an endpoint may name, with their default port (None: the port must be written).
DEFAULT_PORTS: dict[str, int | None] = {"ws": 80, "wss": 443, "http": 80, "https": 443, "tcp": None, "tls": None}
#: Schemes whose connection the stub wraps in TLS itself (the runtime hands over plain TCP).
TLS_SCHEMES = frozenset({"wss", "https", "tls"})
#: Largest ``egress`` list a descriptor may hold.
MAX_ENDPOINTS = 64
_MAX_URL = 2048
_LABEL = re.compile(r"(?!-)[a-z0-9_\-]{1,63}(?<!-)\Z")


class EndpointError(ValueError):
    """An endpoint that is not a URL of the accepted form; the text says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One declared or requested endpoint, normalised (lower-case scheme and host, port always set)."""

    scheme: str
    host: str  # a lower-case name, or an IP literal without brackets
    port: int
    path: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """What a request must share with a declared endpoint to be allowed."""
        return (self.scheme, self.host, self.port)

    @property
    def tls(self) -> bool:
        """Whether the stub is expected to speak TLS on the connection (it wraps the socket itself)."""
        return self.scheme in TLS_SCHEMES

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_endpoint(text: object) -> Endpoint:
    """``text`` as an :class:`Endpoint`, or :class:`EndpointError` saying what is wrong."""
    if not isinstance(text, str):
        raise EndpointError(f"expected a URL string, got {type(text).__name__}")
    if not text or len(text) > _MAX_URL:
        raise EndpointError(f"expected a URL of 1-{_MAX_URL} characters, got {len(text)}")
    if any(c.isspace() or ord(c) < 32 for c in text):
        raise EndpointError(f"{text[:80]!r} contains white space or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise EndpointError(f"{text[:80]!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise EndpointError(f"{text[:80]!r}: scheme must be one of {', '.join(DEFAULT_PORTS)}, got {scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise EndpointError(f"{text[:80]!r}: credentials in the URL are not allowed")
    if parts.query or parts.fragment:
        raise EndpointError(f"{text[:80]!r}: a query or fragment is not allowed")
    host = _host(parts.hostname, text)
    if port is None:
        default = DEFAULT_PORTS[scheme]
        if default is None:
            raise EndpointError(f"{text[:80]!r}: {scheme}:// needs an explicit port")
        port = default
    if not 0 < port < 65536:
        raise EndpointError(f"{text[:80]!r}: port {port} is out of range 1..65535")
    if scheme in ("tcp", "tls") and parts.path not in ("", "/"):
        raise EndpointError(f"{text[:80]!r}: a {scheme}:// endpoint has no path")
    return Endpoint(scheme, host, port, parts.path if scheme not in ("tcp", "tls") else "")


def _host(host: str | None, text: str) -> str:
    if not host:
        raise EndpointError(f"{text[:80]!r}: no host")
    host = host.lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise EndpointError(f"{text[:80]!r}: {host!r} is not a host name or an IP address")
    return ".".join(labels)


def parse_egress(value: object) -> tuple[Endpoint, ...]:
    """A descriptor's ``egress`` list; :class:`EndpointError` names the item (``egress[2]: ...``).

    ``None`` (no field) and ``[]`` both mean "no network at all".
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise EndpointError(f"egress: expected an array of URLs, got {type(value).__name__}")
    if len(value) > MAX_ENDPOINTS:
        raise EndpointError(f"egress: at most {MAX_ENDPOINTS} endpoints, got {len(value)}")
    endpoints: list[Endpoint] = []
    for index, item in enumerate(value):
        try:
            endpoints.append(parse_endpoint(item))
        except EndpointError as exc:
            raise EndpointError(f"egress[{index}]: {exc}") from None
    return tuple(endpoints)
