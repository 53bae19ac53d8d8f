"""Finding, fetching and accepting one stub, as a sans-I/O state machine.

:class:`StubFetch` takes events (``Response``, a transport error) and returns actions (``Get`` a URL,
``Done`` with a verified stub, ``Fail``); it never touches a socket, a clock or a disk, so every path
(fallbacks, 304, offline reuse, each verification failure) is tested without a network.  The asyncio
shell is :class:`protofly.catalogue.client.CatalogueClient`.

Candidate URLs for ``<domain>``/``<name>`` (``docs/architecture.md``, *Catalogue*), each built on the
resolver's base URL for the domain when there is one:

1. the URL the caller gave, if the reference was a URL;
2. catalogue layout ``https://catalogue.<domain>/.well-known/protocolstub/<name>``;
3. static layout ``https://<domain>/.well-known/protocolstub/<name>.ps.json`` (source next to it:
   ``<name>.ps.py`` for Python stubs, ``<name>.ps.js`` otherwise, unless ``sourcePackageURL`` says);
4. for the ``default`` stub only, the home catalogue's ``protocolstub/<domain>`` (catalogue, then
   static layout), signed by the *home* domain's key.

The cached URL, when there is one, goes first so that an unchanged stub costs one ``304``.  A transport
failure (connection, timeout, HTTP error, size, a body that is not JSON at all) moves on to the next
candidate, and when all fail a cached stub is reused ("offline").  A verification failure stops at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from protofly import address
from protofly.catalogue.cache import CacheEntry
from protofly.catalogue.errors import (
    E_FETCH,
    E_INSECURE,
    E_TOO_LARGE,
    CatalogueError,
    DescriptorError,
)
from protofly.catalogue.keys import TrustStore
from protofly.catalogue.model import (
    DEFAULT_MAX_DESCRIPTOR_SIZE,
    ProtocolStubDescriptor,
    decode_json,
    parse_descriptor,
    parse_source_package,
)
from protofly.catalogue.verify import check_signer_still_trusted, check_update, verify_stub

__all__ = [
    "Action",
    "CachedStub",
    "Candidate",
    "Done",
    "Fail",
    "FetchTimings",
    "Get",
    "Response",
    "StubFetch",
    "VerifiedStub",
    "plan",
    "source_url_for",
    "transport_url",
]

#: Errors after which the next candidate URL (and finally the cache) is tried.
_MOVE_ON = frozenset({E_FETCH, E_TOO_LARGE, E_INSECURE})


@dataclass(frozen=True, slots=True)
class FetchTimings:
    """Where fetching a stub spent its time, in milliseconds (for the deploy timeline).

    A value of its own, set when the client has finished, so the :class:`VerifiedStub` carrying it
    stays immutable; zero when the stub did not come through a fetch (e.g. read from the cache alone).
    """

    download: float = 0.0
    verify: float = 0.0
    cache: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"download": self.download, "verify": self.verify, "cache": self.cache, "total": self.total}


@dataclass(frozen=True, slots=True)
class VerifiedStub:
    """A stub whose descriptor and source passed every check; the only thing the runtime may run."""

    descriptor: ProtocolStubDescriptor
    source: bytes = field(repr=False)
    sha256: str
    url: str
    from_cache: bool
    signer: str | None
    domain: str
    name: str
    signer_domain: str
    revalidated: bool = False
    offline: bool = False
    warnings: tuple[str, ...] = ()
    timings: FetchTimings = FetchTimings()

    @property
    def version(self) -> str:
        return self.descriptor.version


@dataclass(frozen=True, slots=True)
class CachedStub:
    entry: CacheEntry
    descriptor: ProtocolStubDescriptor


@dataclass(frozen=True, slots=True)
class Candidate:
    url: str
    layout: str
    signer_domain: str
    name: str


# -- actions and events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Get:
    url: str
    etag: str | None
    purpose: str  # "descriptor", "package" or "source"


@dataclass(frozen=True, slots=True)
class Done:
    stub: VerifiedStub
    store: CacheEntry | None = None  # a new verified entry to write
    refreshed: CacheEntry | None = None  # a revalidated entry (new freshness / ETag) to write


@dataclass(frozen=True, slots=True)
class Fail:
    error: CatalogueError


Action = Get | Done | Fail


@dataclass(frozen=True, slots=True)
class Response:
    url: str  # final URL, after redirects
    status: int
    body: bytes
    etag: str | None = None
    max_age: float = 0.0


# -- URLs -----------------------------------------------------------------------------------------------


def transport_url(url: str, resolver: Mapping[str, str]) -> str:
    """``hyperty-catalogue://`` → ``https://``; a host the resolver knows → that base URL."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme in ("hyperty-catalogue", "") else parts.scheme
    host = (parts.hostname or "").lower()
    base = resolver.get(host) or (
        resolver.get(host.removeprefix("catalogue.")) if host.startswith("catalogue.") else None
    )
    if base:
        root = urlsplit(base.rstrip("/"))
        return urlunsplit((root.scheme, root.netloc, root.path + parts.path, parts.query, ""))
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def plan(
    domain: str,
    name: str,
    *,
    home_domain: str,
    resolver: Mapping[str, str],
    direct_url: str | None = None,
) -> list[Candidate]:
    """The URLs to try, in order, each with the domain whose key must have signed what it serves."""
    base = resolver.get(domain)
    out = []
    if direct_url is not None:
        out.append(Candidate(transport_url(direct_url, resolver), "direct", domain, name))
    out.append(Candidate(address.catalogue_url(domain, name, base=base), "catalogue", domain, name))
    out.append(Candidate(address.static_url(domain, name, base=base), "static", domain, name))
    if name == "default" and domain != home_domain:
        home_base = resolver.get(home_domain)
        out.append(
            Candidate(address.home_fallback_url(home_domain, domain, base=home_base), "home", home_domain, domain)
        )
        out.append(
            Candidate(address.static_url(home_domain, domain, base=home_base), "home-static", home_domain, domain)
        )
    unique: dict[str, Candidate] = {}
    for candidate in out:
        unique.setdefault(candidate.url, candidate)
    return list(unique.values())


def source_url_for(
    descriptor: ProtocolStubDescriptor, descriptor_url: str, resolver: Mapping[str, str]
) -> tuple[str, str] | None:
    """Where to get the source when the descriptor does not embed it: ``(url, "package" | "source")``."""
    ref = descriptor.source_package_url
    parts = urlsplit(descriptor_url)
    if ref and ref.strip().lower() != "/sourcepackage":
        if "://" in ref:
            return transport_url(ref, resolver), "package"
        path = ref if ref.startswith("/.well-known/") else "/.well-known" + (ref if ref.startswith("/") else "/" + ref)
        return urlunsplit((parts.scheme, parts.netloc, path, "", "")), "package"
    if parts.path.endswith(".ps.json"):
        suffix = ".ps.py" if descriptor.is_python else ".ps.js"
        return urlunsplit((parts.scheme, parts.netloc, parts.path[: -len(".ps.json")] + suffix, "", "")), "source"
    if ref:  # the "/sourcePackage" sentinel: embedded, also readable as a sub-resource
        return descriptor_url.rstrip("/") + "/sourcePackage", "package"
    return None


def _without_source(raw: dict[str, Any]) -> bytes:
    """The descriptor as cached: the source lives once, in the content-addressed blob table."""
    package = raw.get("sourcePackage")
    if isinstance(package, dict) and "sourceCode" in package:
        raw = {**raw, "sourcePackage": {k: v for k, v in package.items() if k != "sourceCode"}}
    return msgspec.json.encode(raw)


# -- the machine ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    candidate: Candidate
    descriptor: ProtocolStubDescriptor
    url: str
    etag: str | None
    max_age: float


class StubFetch:
    """One ``fetch_stub`` call: ``start()``, then feed ``on_response``/``on_error`` until Done or Fail."""

    def __init__(
        self,
        *,
        domain: str,
        name: str,
        candidates: list[Candidate],
        cached: CachedStub | None,
        trust: TrustStore | None,
        policy: str,
        now: float,
        resolver: Mapping[str, str] | None = None,
        refresh: bool = False,
        max_size: int = DEFAULT_MAX_DESCRIPTOR_SIZE,
    ) -> None:
        self.domain = domain
        self.name = name
        self._cached = cached
        self._trust = trust
        self._policy = policy
        self._now = now
        self._resolver = resolver or {}
        self._refresh = refresh
        self._max_size = max_size
        self._candidates = self._cached_first(candidates)
        self._index = 0
        self._sent_etag: str | None = None
        self._pending: _Pending | None = None
        self._purpose = "descriptor"
        self.attempts: list[tuple[str, CatalogueError]] = []

    def _cached_first(self, candidates: list[Candidate]) -> list[Candidate]:
        if self._cached is None:
            return list(candidates)
        url = self._cached.entry.url
        return sorted(candidates, key=lambda c: c.url != url)  # stable: the rest keep their order

    @property
    def candidate(self) -> Candidate | None:
        return self._candidates[self._index] if self._index < len(self._candidates) else None

    def start(self) -> Action:
        cached = self._cached
        if cached is not None and not self._refresh and cached.entry.fresh_until > self._now:
            return self._reuse()
        return self._request_descriptor()

    def on_response(self, response: Response) -> Action:
        try:
            if self._pending is None:
                return self._on_descriptor(response)
            return self._on_source(response, self._pending)
        except CatalogueError as exc:
            if exc.code in _MOVE_ON:
                return self._next(exc)
            return Fail(exc)

    def on_error(self, error: CatalogueError) -> Action:
        """A transport failure of the last ``Get`` (the shell maps exceptions to ``E_FETCH`` & co.)."""
        if error.code not in _MOVE_ON:
            return Fail(error)
        return self._next(error)

    # -- steps ----------------------------------------------------------------------------------------

    def _request_descriptor(self) -> Action:
        candidate = self.candidate
        if candidate is None:
            return self._exhausted()
        cached = self._cached
        self._sent_etag = cached.entry.etag if cached is not None and cached.entry.url == candidate.url else None
        self._pending = None
        return Get(candidate.url, self._sent_etag, "descriptor")

    def _next(self, error: CatalogueError) -> Action:
        candidate = self.candidate
        self.attempts.append((candidate.url if candidate else "", error))
        self._index += 1
        return self._request_descriptor()

    def _on_descriptor(self, response: Response) -> Action:
        candidate = self.candidate
        assert candidate is not None
        if response.status == 304:
            if self._sent_etag is None:
                raise CatalogueError(E_FETCH, "HTTP 304 to a request that was not conditional", url=response.url)
            return self._reuse(revalidated=True, max_age=response.max_age, etag=response.etag)
        if response.status != 200:
            raise CatalogueError(E_FETCH, f"HTTP {response.status}", url=response.url)
        try:
            obj = decode_json(response.body, what="descriptor", url=response.url, max_size=self._max_size)
        except DescriptorError as exc:
            # Not JSON at all: a web server that is not a catalogue (an HTML page, a captive portal).
            return self._next(exc)
        descriptor = parse_descriptor(obj, url=response.url)
        pending = _Pending(candidate, descriptor, response.url, response.etag, response.max_age)
        package = descriptor.source_package
        if package is not None and package.embedded:
            source, warning = package.decode()
            return self._finish(pending, source, warning)
        cached = self._cached
        if (
            cached is not None
            and descriptor.source_sha256 is not None
            and descriptor.source_sha256 == cached.entry.sha256
        ):
            return self._finish(pending, cached.entry.source, None)  # content-addressed: already have it
        where = source_url_for(descriptor, response.url, self._resolver)
        if where is None:
            raise DescriptorError(
                "sourcePackage", "no embedded sourceCode and no sourcePackageURL to fetch it from", url=response.url
            )
        self._pending = pending
        self._purpose = where[1]
        return Get(where[0], None, where[1])

    def _on_source(self, response: Response, pending: _Pending) -> Action:
        if response.status != 200:
            raise CatalogueError(E_FETCH, f"source: HTTP {response.status}", url=response.url)
        if self._purpose == "package":
            package = parse_source_package(response.body, url=response.url, max_size=self._max_size)
            expected = pending.descriptor.source_sha256
            if package.sha256 is None and expected is not None:
                package = dataclasses.replace(package, sha256=expected)
            source, warning = package.decode()
            return self._finish(pending, source, warning)
        return self._finish(pending, response.body, None)

    def _finish(self, pending: _Pending, source: bytes, warning: str | None) -> Action:
        candidate = pending.candidate
        verdict = verify_stub(
            pending.descriptor,
            source,
            trust=self._trust,
            policy=self._policy,
            signer_domain=candidate.signer_domain,
            requested_name=candidate.name,
            url=pending.url,
        )
        cached = self._cached
        if cached is not None:
            check_update(
                cached_version=cached.entry.version,
                cached_digest=cached.entry.descriptor_digest,
                new_version=pending.descriptor.version,
                new_digest=verdict.descriptor_digest,
                what=f"stub {self.name!r} of {self.domain}",
                url=pending.url,
            )
        warnings = (warning, *verdict.warnings) if warning else verdict.warnings
        entry = CacheEntry(
            domain=self.domain,
            name=self.name,
            url=candidate.url,
            etag=pending.etag,
            fresh_until=self._now + pending.max_age,
            version=pending.descriptor.version,
            sha256=verdict.sha256,
            descriptor_digest=verdict.descriptor_digest,
            signer=verdict.signer,
            signer_domain=candidate.signer_domain,
            descriptor=_without_source(pending.descriptor.raw),
            fetched_at=self._now,
            source=source,
        )
        stub = VerifiedStub(
            descriptor=pending.descriptor,
            source=source,
            sha256=verdict.sha256,
            url=pending.url,
            from_cache=False,
            signer=verdict.signer,
            domain=self.domain,
            name=self.name,
            signer_domain=candidate.signer_domain,
            warnings=warnings,
        )
        return Done(stub, store=entry)

    def _reuse(self, *, revalidated: bool = False, max_age: float = 0.0, etag: str | None = None) -> Action:
        cached = self._cached
        assert cached is not None
        entry = cached.entry
        offline = self._index >= len(self._candidates)
        try:
            check_signer_still_trusted(
                entry.signer, trust=self._trust, policy=self._policy, signer_domain=entry.signer_domain, url=entry.url
            )
        except CatalogueError as exc:
            return Fail(exc)
        warnings: tuple[str, ...] = ()
        if offline:
            warnings = (f"catalogue unreachable; using the cached version {entry.version or '(none)'}",)
        refreshed = None
        if revalidated and (max_age > 0 or (etag is not None and etag != entry.etag)):
            # Only a new freshness lifetime or a new ETag is worth a write; "no-cache" 304s cost none.
            refreshed = dataclasses.replace(entry, fresh_until=self._now + max_age, etag=etag or entry.etag)
        stub = VerifiedStub(
            descriptor=cached.descriptor,
            source=entry.source,
            sha256=entry.sha256,
            url=entry.url,
            from_cache=True,
            signer=entry.signer,
            domain=self.domain,
            name=self.name,
            signer_domain=entry.signer_domain,
            revalidated=revalidated,
            offline=offline,
            warnings=warnings,
        )
        return Done(stub, refreshed=refreshed)

    def _exhausted(self) -> Action:
        if self._cached is not None:
            return self._reuse()
        tried = "; ".join(f"{url}: {exc.message}" for url, exc in self.attempts) or "no candidate URL"
        code = next((exc.code for _, exc in self.attempts if exc.code != E_FETCH), E_FETCH)
        return Fail(
            CatalogueError(
                code,
                f"no catalogue served stub {self.name!r} for {self.domain} and nothing is cached; tried {tried}",
                url=self.attempts[0][0] if self.attempts else None,
            )
        )
