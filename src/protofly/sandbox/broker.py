"""The runtime's side of a stub's network: it opens the connections the stub's descriptor declares.

A stub has no network of its own (its process sits in an empty network namespace), so when it calls
``open_connection(url)`` the request crosses the sandbox channel and lands here.  :class:`EgressBroker`
checks the URL against the descriptor's signed ``egress`` list, resolves the host through the runtime's
own map (``RuntimeConfig.hosts``; DNS only when ``resolver_only`` is off), connects with its own timeout,
and returns the connected socket, which the process sandbox passes to the stub over a unix socket
(``SCM_RIGHTS``) and the in-process sandbox hands over as it is.

Every refusal is an :class:`EgressRefused` with an HTTP-style code and a description naming the URL, is
counted on the component (``egress_refused``; ``egress_opened`` for the connections made) and logged,
the first few and then one in every thousand, so a stub looping on refused requests cannot flood the log.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from protofly.log import get_logger
from protofly.sandbox.egress import Endpoint, EndpointError, parse_endpoint
from protofly.stub import EgressError

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "EgressBroker", "EgressPolicy", "EgressRefused"]

_log = get_logger("protofly.sandbox.egress")

#: Seconds a brokered connect may take (resolution included) unless configured otherwise.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Log every refusal up to this count, then one line per ``_LOG_EVERY``.
_LOG_FIRST = 10
_LOG_EVERY = 1000


class EgressRefused(Exception):
    """A connection the broker would not or could not open; ``code`` is HTTP-style (400, 403, 502, 504)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass(frozen=True)
class EgressPolicy:
    """What one stub may reach and how the runtime resolves and connects (built per deploy).

    ``endpoints`` come from the stub's signed descriptor; ``hosts`` (name → IP address), ``resolver_only``
    and ``connect_timeout`` from the runtime's configuration.
    """

    endpoints: tuple[Endpoint, ...] = ()
    hosts: Mapping[str, str] = field(default_factory=dict)
    resolver_only: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def declared(self) -> list[str]:
        return [str(endpoint) for endpoint in self.endpoints]


#: No endpoint at all: what a stub whose descriptor has no ``egress`` gets.
NO_EGRESS = EgressPolicy()


class EgressBroker:
    """Opens a stub's declared connections; counts into the component's ``counters``."""

    def __init__(self, policy: EgressPolicy, counters: dict[str, int], *, stub_url: str = "") -> None:
        self.policy = policy
        self.counters = counters
        self._allowed = {endpoint.key for endpoint in policy.endpoints}
        self._log = _log.bind(stub_url=stub_url) if stub_url else _log

    async def open(self, url: object) -> socket.socket:
        """A connected, non-blocking TCP socket to ``url``; :class:`EgressRefused` if not allowed or not reachable."""
        try:
            endpoint = self._check(url)
            sock = await self._connect(endpoint)
        except EgressRefused as exc:
            self.refused(exc)
            raise
        self.counters["egress_opened"] = self.counters.get("egress_opened", 0) + 1
        return sock

    async def connector(self, url: str) -> socket.socket:
        """:meth:`open` as a stub's bus wants it (a ``Connector``): refusals raised as the SDK's ``EgressError``."""
        try:
            return await self.open(url)
        except EgressRefused as exc:
            raise EgressError(exc.code, exc.description) from None

    def _check(self, url: object) -> Endpoint:
        try:
            endpoint = parse_endpoint(url)
        except EndpointError as exc:
            raise EgressRefused(400, f"egress: malformed URL: {exc}") from None
        if endpoint.key not in self._allowed:
            declared = ", ".join(self.policy.declared()) or "nothing"
            raise EgressRefused(
                403, f"egress: {endpoint} not declared by the stub's descriptor (it declares {declared})"
            )
        return endpoint

    async def _connect(self, endpoint: Endpoint) -> socket.socket:
        timeout = self.policy.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(endpoint)
                return await _connect_any(endpoint, addresses)
        except TimeoutError:
            raise EgressRefused(504, f"egress: connect to {endpoint} timed out after {timeout:g} s") from None

    async def _resolve(self, endpoint: Endpoint) -> list[tuple[int, str]]:
        """(family, address) pairs: the hosts map first, an IP literal as is, DNS unless resolver_only."""
        mapped = self.policy.hosts.get(endpoint.host)
        literal = mapped if mapped is not None else (endpoint.host if endpoint.is_ip else None)
        if literal is not None:
            ip = ipaddress.ip_address(literal)
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]
        if self.policy.resolver_only:
            raise EgressRefused(
                502, f"egress: {endpoint.host} is not in the runtime's hosts map (resolver_only: no DNS look-up)"
            )
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise EgressRefused(502, f"egress: cannot resolve {endpoint.host}: {exc.strerror}") from None
        return [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]

    def refused(self, exc: EgressRefused) -> None:
        """Count and (rate-limited) log a refusal; also for requests refused before they reach :meth:`open`."""
        count = self.counters["egress_refused"] = self.counters.get("egress_refused", 0) + 1
        if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
            self._log.warning("refused a stub's connection", code=exc.code, reason=exc.description, count=count)


async def _connect_any(endpoint: Endpoint, addresses: list[tuple[int, str]]) -> socket.socket:
    """Try each address in turn (the caller bounds the whole); the last error names the endpoint."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (address, endpoint.port))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if last is None:
        text = "no address"
    elif last.errno:
        text = f"{os.strerror(last.errno)} ({errno.errorcode.get(last.errno, last.errno)})"
    else:
        text = str(last) or type(last).__name__
    raise EgressRefused(502, f"egress: cannot connect to {endpoint}: {text}")
