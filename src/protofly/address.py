"""reTHINK addresses: parse them, build the runtime's own, and find the domain that serves one.

Addresses are logical routing names (``hyperty://b.test/123``, ``domain://msg-node.b.test/sm``,
``hyperty-runtime://a.test/<id>/protostub/3``); they never resolve through DNS.  The one question the
runtime asks of a foreign address is *which domain's stub carries it*, so :func:`serving_domain` is fast
(cached) and strict: garbage raises :class:`AddressError` instead of routing somewhere surprising.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "Address",
    "AddressError",
    "catalogue_url",
    "home_fallback_url",
    "is_within",
    "kind",
    "new_runtime_id",
    "parse",
    "runtime_url",
    "serving_domain",
    "split_stub_reference",
    "static_url",
    "status_url",
    "stub_url",
    "validate_domain",
]

MAX_LENGTH = 2048

_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*\Z")
_LABEL = re.compile(r"(?!-)[a-z0-9_\-]{1,63}(?<!-)\Z")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]\Z")
_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f<>\"\\^`{|}]")

#: scheme → kind.  Business-role domains (``domain-idp``…) are their own kind because the registry keeps
#: IdP proxies apart from protocol stubs.
_KINDS = {
    "hyperty": "hyperty",
    "hyperty-runtime": "hyperty-runtime",
    "runtime": "hyperty-runtime",
    "domain": "domain",
    "global": "global",
    "user": "user",
    "user-guid": "user-guid",
    "acct": "user-account",
    "hyperty-catalogue": "catalogue",
    "comm": "comm",
    "connection": "connection",
    "ctxt": "context",
    "mn": "message-node",
}
_NEEDS_HOST = frozenset(
    {"hyperty", "hyperty-runtime", "runtime", "domain", "hyperty-catalogue", "comm", "connection", "ctxt"}
)
#: Functional-element labels that name a service of a domain rather than the domain itself.
_SERVICE_LABELS = ("msg-node.", "registry.")


class AddressError(ValueError):
    """An address (or domain) that cannot be parsed; the text quotes it and says why."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address.  ``host`` is lower case and without user info or port; ``path`` keeps its ``/``."""

    raw: str
    scheme: str
    host: str | None
    port: int | None
    path: str

    @property
    def kind(self) -> str:
        return kind_of_scheme(self.scheme)


def kind_of_scheme(scheme: str) -> str:
    if scheme.startswith("domain-"):
        return "domain-role"
    return _KINDS.get(scheme, "other")


@lru_cache(maxsize=65536)
def parse(address: str) -> Address:
    """Parse ``scheme://host[:port]/path`` or ``scheme:path`` (the message node's ``mn:/session``)."""
    if not isinstance(address, str):
        raise AddressError(f"address must be a string, got {type(address).__name__}")
    if not address:
        raise AddressError("address is empty")
    if len(address) > MAX_LENGTH:
        raise AddressError(f"address of {len(address)} characters is over the {MAX_LENGTH}-character limit")
    if _FORBIDDEN.search(address):
        raise AddressError(f"address {address!r} contains whitespace or a forbidden character")
    scheme, sep, rest = address.partition(":")
    scheme = scheme.lower()
    if not sep or not _SCHEME.match(scheme):
        raise AddressError(f"address {address!r} has no valid scheme (expected 'scheme://...')")
    if not rest.startswith("//"):
        if scheme in _NEEDS_HOST:
            raise AddressError(f"address {address!r}: scheme {scheme!r} needs '//host'")
        return Address(address, scheme, None, None, rest)
    authority, slash, path = rest[2:].partition("/")
    host, port = _split_authority(address, authority)
    return Address(address, scheme, host, port, slash + path)


def _split_authority(address: str, authority: str) -> tuple[str, int | None]:
    hostport = authority.rpartition("@")[2].lower()
    port: int | None = None
    if hostport.startswith("["):
        host, _, tail = hostport.partition("]")
        host += "]"
        if tail:
            port = _port(address, tail.removeprefix(":"))
        if not _IPV6.match(host):
            raise AddressError(f"address {address!r} has an invalid IPv6 host")
        return host, port
    host, colon, porttext = hostport.partition(":")
    if colon:
        port = _port(address, porttext)
    _check_host(address, host)
    return host, port


def _port(address: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise AddressError(f"address {address!r} has an invalid port {text!r}")
    return int(text)


def _check_host(address: str, host: str) -> None:
    if not host:
        raise AddressError(f"address {address!r} has an empty host")
    if len(host) > 253:
        raise AddressError(f"address {address!r} has a host longer than 253 characters")
    for label in host.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"address {address!r} has an invalid host label {label!r}")


def validate_domain(domain: str) -> str:
    """Return ``domain`` in lower case if it is a plain host name, else raise :class:`AddressError`."""
    if not isinstance(domain, str) or not domain:
        raise AddressError(f"domain must be a non-empty string, got {domain!r}")
    lowered = domain.lower()
    _check_host(f"domain {domain!r}", lowered)
    return lowered


def kind(address: str) -> str:
    """The kind of an address: ``hyperty``, ``hyperty-runtime``, ``domain``, ``global``, ``user``, ...

    Unknown schemes (``slack://``, ``resource://``) are of kind ``other``: legal, but carried by a stub
    chosen by their host like any foreign address.
    """
    return parse(address).kind


@lru_cache(maxsize=65536)
def serving_domain(address: str) -> str | None:
    """The domain whose stub carries ``address``: its host without a leading ``msg-node.``/``registry.``.

    ``global://`` addresses and host-less ones (``mn:/session``) return None: no domain serves them by
    their name, and the caller (the registry) decides.
    """
    parsed = parse(address)
    if parsed.host is None or parsed.scheme == "global":
        return None
    host = parsed.host
    for label in _SERVICE_LABELS:
        if host.startswith(label) and len(host) > len(label):
            return host[len(label) :]
    return host


def is_within(address: str, prefix: str) -> bool:
    """True if ``address`` is ``prefix`` itself or a path below it (``<prefix>/...``)."""
    return address == prefix or (address.startswith(prefix) and address[len(prefix)] == "/")


def new_runtime_id() -> str:
    return uuid.uuid4().hex


def runtime_url(domain: str, runtime_id: str) -> str:
    """``hyperty-runtime://<domain>/<runtime-id>``."""
    if not runtime_id or "/" in runtime_id or _FORBIDDEN.search(runtime_id):
        raise AddressError(f"runtime id {runtime_id!r} must be a non-empty path segment")
    return f"hyperty-runtime://{validate_domain(domain)}/{runtime_id}"


def stub_url(runtime: str, number: int) -> str:
    """``<runtimeURL>/protostub/<n>``; the registry never hands the same ``n`` out twice."""
    if number < 1:
        raise AddressError(f"stub number must be positive, got {number}")
    return f"{runtime}/protostub/{number}"


def status_url(url: str) -> str:
    """The resource where a component publishes its status: ``<url>/status``."""
    return f"{url}/status"


# -- catalogue well-known URLs (docs/architecture.md, Catalogue) --------------------------------------


def catalogue_url(domain: str, name: str = "default", *, base: str | None = None) -> str:
    """Catalogue layout: ``https://catalogue.<domain>/.well-known/protocolstub/<name>``.

    ``base`` replaces ``https://catalogue.<domain>`` (the resolver map sends a domain to 127.0.0.1).
    """
    root = base.rstrip("/") if base else f"https://catalogue.{validate_domain(domain)}"
    return f"{root}/.well-known/protocolstub/{_check_name(name)}"


def static_url(domain: str, name: str = "default", *, base: str | None = None) -> str:
    """Static layout: ``https://<domain>/.well-known/protocolstub/<name>.ps.json``."""
    root = base.rstrip("/") if base else f"https://{validate_domain(domain)}"
    return f"{root}/.well-known/protocolstub/{_check_name(name)}.ps.json"


def home_fallback_url(home_domain: str, domain: str, *, base: str | None = None) -> str:
    """Where the home catalogue keeps a stub for a domain that publishes none: ``protocolstub/<domain>``."""
    return catalogue_url(home_domain, validate_domain(domain), base=base)


def split_stub_reference(reference: str) -> tuple[str, str]:
    """Split what ``load_stub`` accepts into ``(domain, stub name)``.

    A bare domain names its ``default`` stub.  A catalogue URL
    (``hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/sip``, ``https://b.test/.well-known/
    protocolstub/sip.ps.json``) names the stub at its end, and the domain is the host without a leading
    ``catalogue.`` label: the reference runtime registers such stubs under ``catalogue.b.test`` and then
    never finds them when routing for ``b.test``.
    """
    if "://" not in reference:
        return validate_domain(reference), "default"
    parsed = parse(reference)
    if parsed.host is None:
        raise AddressError(f"stub reference {reference!r} has no host")
    domain = parsed.host.removeprefix("catalogue.") if parsed.host.startswith("catalogue.") else parsed.host
    segments = [s for s in parsed.path.split("/") if s]
    name = "default"
    for marker in ("protocolstub", "protostub"):
        if marker in segments:
            index = segments.index(marker)
            if index + 1 < len(segments):
                name = segments[index + 1].removesuffix(".ps.json")
            break
    else:
        if segments:
            raise AddressError(f"stub reference {reference!r} is not a .well-known/protocolstub URL")
    return validate_domain(domain), _check_name(name)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")


def _check_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise AddressError(f"stub name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name
