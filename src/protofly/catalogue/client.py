"""The catalogue client: the asyncio shell around :class:`~protofly.catalogue.fetch.StubFetch`.

It owns one aiohttp session and the SQLite cache, and adds what the state machine leaves out: the
transport policy (https with certificate verification; plain http only to loopback and only on opt-in;
bounded redirects checked hop by hop; connect/read/total timeouts; a size limit enforced while the body
streams in), the cache I/O (in a worker thread, behind an in-memory mirror), per-stub serialisation, and
counters and timings for the deploy timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

from protofly import address
from protofly.catalogue.cache import CACHE_FILE, StubCache
from protofly.catalogue.errors import E_FETCH, E_INSECURE, E_SCHEMA, E_TOO_LARGE, CatalogueError
from protofly.catalogue.fetch import (
    CachedStub,
    Done,
    Fail,
    FetchTimings,
    Get,
    Response,
    StubFetch,
    VerifiedStub,
    plan,
)
from protofly.catalogue.keys import TrustStore
from protofly.catalogue.model import DEFAULT_MAX_DESCRIPTOR_SIZE, parse_descriptor
from protofly.catalogue.verify import check_policy
from protofly.log import get_logger

__all__ = ["CatalogueClient", "ClientStats", "describe"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)")
_CHUNK = 64 * 1024

_log = get_logger(__name__)

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class ClientStats:
    """Counters since the client opened (for metrics and the deploy timeline)."""

    fetches: int = 0
    requests: int = 0
    bytes_downloaded: int = 0
    not_modified: int = 0
    fresh_hits: int = 0
    offline_hits: int = 0
    stored: int = 0
    failures: Counter[str] = field(default_factory=Counter)


class _Held:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _KeyedLocks(Generic[K]):
    """One lock per key, kept only while a task holds or waits for it.

    Fetches of one stub are serialised (the second reuses what the first stored), but the keys are
    whatever references callers name, so a lock kept forever per key would grow without bound.
    """

    def __init__(self) -> None:
        self._held: dict[K, _Held] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = _Held()
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if held.users == 0:
                del self._held[key]


class CatalogueClient:
    """Fetches, verifies and caches protocol stubs.  Use as ``async with CatalogueClient(...) as c``.

    ``resolver`` maps a domain to a base URL (``{"b.test": "http://127.0.0.1:8080"}``) used for both
    layouts of that domain (and for the home catalogue when the home domain is mapped).  With
    ``resolver_only`` no URL outside the resolver's hosts is contacted (tests, demos).  ``state_dir=None``
    keeps the cache in memory.
    """

    def __init__(
        self,
        *,
        home_domain: str,
        state_dir: Path | None = None,
        resolver: Mapping[str, str] | None = None,
        trust: TrustStore | None = None,
        policy: str = "require",
        allow_http_loopback: bool = False,
        resolver_only: bool = False,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        total_timeout: float = 10.0,
        fetch_timeout: float = 30.0,
        max_size: int = DEFAULT_MAX_DESCRIPTOR_SIZE,
        max_redirects: int = 3,
        max_age_cap: float = 86400.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.home_domain = address.validate_domain(home_domain)
        self.resolver = {address.validate_domain(d): base.rstrip("/") for d, base in (resolver or {}).items()}
        self.trust = trust
        self.policy = check_policy(policy)
        self.allow_http_loopback = allow_http_loopback
        self.resolver_only = resolver_only
        self.max_size = max_size
        self.max_redirects = max_redirects
        self.max_age_cap = max_age_cap
        self.fetch_timeout = fetch_timeout
        self.stats = ClientStats()
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._timeout = aiohttp.ClientTimeout(total=total_timeout, sock_connect=connect_timeout, sock_read=read_timeout)
        self._timeouts = (connect_timeout, read_timeout, total_timeout)
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._allowed_hosts = {urlsplit(base).hostname for base in self.resolver.values()}
        self._session: aiohttp.ClientSession | None = None
        self._cache: StubCache | None = None
        self._mirror: dict[tuple[str, str], CachedStub] = {}
        self._known: set[tuple[str, str]] = set()
        self._locks: _KeyedLocks[tuple[str, str]] = _KeyedLocks()

    # -- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> CatalogueClient:
        path = self._state_dir / CACHE_FILE if self._state_dir is not None else None
        self._cache = await asyncio.to_thread(StubCache, path)
        self._known = {(d, n) for d, n, *_ in await asyncio.to_thread(self._cache.entries)}
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._cache is not None:
            cache, self._cache = self._cache, None
            await asyncio.to_thread(cache.close)

    # -- the API ----------------------------------------------------------------------------------------

    async def fetch_stub(self, reference: str, *, refresh: bool = False) -> VerifiedStub:
        """The verified stub for a bare domain (its ``default`` stub) or a catalogue URL.

        ``refresh`` ignores the freshness the catalogue granted (``Cache-Control: max-age``) and
        revalidates now.  Raises :class:`CatalogueError`; nothing unverified is ever returned.
        """
        domain, name = self._split(reference)
        direct = reference if "://" in reference else None
        self.stats.fetches += 1
        started = time.perf_counter()
        try:
            async with self._locks.hold((domain, name)), asyncio.timeout(self.fetch_timeout):
                stub = await self._fetch(domain, name, direct, refresh)
        except CatalogueError as exc:
            self.stats.failures[exc.code] += 1
            _log.warning("stub fetch failed", domain=domain, stub=name, code=exc.code, error=exc.message, url=exc.url)
            raise
        except TimeoutError:
            self.stats.failures[E_FETCH] += 1
            raise CatalogueError(
                E_FETCH, f"fetching stub {name!r} of {domain} took over {self.fetch_timeout} s"
            ) from None
        return replace(stub, timings=replace(stub.timings, total=(time.perf_counter() - started) * 1000))

    async def forget(self, reference: str) -> int:
        """Drop a cached stub (the explicit way to accept a rollback or changed bytes)."""
        domain, name = self._split(reference)
        self._mirror.pop((domain, name), None)
        self._known.discard((domain, name))
        return await asyncio.to_thread(self._require_cache().forget, domain, name)

    async def cached(self, reference: str) -> VerifiedStub | None:
        """The cached stub for ``reference`` without any network access (None when not cached)."""
        domain, name = self._split(reference)
        hit = await self._load_cached(domain, name)
        if hit is None:
            return None
        entry = hit.entry
        return VerifiedStub(
            descriptor=hit.descriptor,
            source=entry.source,
            sha256=entry.sha256,
            url=entry.url,
            from_cache=True,
            signer=entry.signer,
            domain=domain,
            name=name,
            signer_domain=entry.signer_domain,
        )

    # -- internals --------------------------------------------------------------------------------------

    def _split(self, reference: str) -> tuple[str, str]:
        try:
            return address.split_stub_reference(reference)
        except address.AddressError as exc:
            raise CatalogueError(E_SCHEMA, f"stub reference {reference!r}: {exc}") from None

    def _require_cache(self) -> StubCache:
        if self._cache is None or self._session is None:
            raise RuntimeError("CatalogueClient is not open; use 'async with CatalogueClient(...)'")
        return self._cache

    async def _fetch(self, domain: str, name: str, direct: str | None, refresh: bool) -> VerifiedStub:
        timings = {"download": 0.0, "verify": 0.0, "cache": 0.0}  # ms, summed over the candidates tried
        mark = time.perf_counter()
        cached = await self._load_cached(domain, name)
        timings["cache"] += (time.perf_counter() - mark) * 1000
        machine = StubFetch(
            domain=domain,
            name=name,
            candidates=plan(domain, name, home_domain=self.home_domain, resolver=self.resolver, direct_url=direct),
            cached=cached,
            trust=self.trust,
            policy=self.policy,
            now=time.time(),
            resolver=self.resolver,
            refresh=refresh,
            max_size=self.max_size,
        )
        mark = time.perf_counter()
        action = machine.start()
        timings["verify"] += (time.perf_counter() - mark) * 1000
        while isinstance(action, Get):
            mark = time.perf_counter()
            try:
                response = await self._get(action)
            except CatalogueError as exc:
                timings["download"] += (time.perf_counter() - mark) * 1000
                action = machine.on_error(exc)
                continue
            after = time.perf_counter()
            timings["download"] += (after - mark) * 1000
            action = machine.on_response(response)
            timings["verify"] += (time.perf_counter() - after) * 1000
        if isinstance(action, Fail):
            raise action.error
        assert isinstance(action, Done)
        mark = time.perf_counter()
        await self._remember(action)
        timings["cache"] += (time.perf_counter() - mark) * 1000
        stub = action.stub
        self._count(stub)
        for warning in stub.warnings:
            _log.warning(warning, domain=domain, stub=name, url=stub.url)
        return replace(stub, timings=FetchTimings(**timings))

    def _count(self, stub: VerifiedStub) -> None:
        if stub.offline:
            self.stats.offline_hits += 1
        elif stub.revalidated:
            self.stats.not_modified += 1
        elif stub.from_cache:
            self.stats.fresh_hits += 1

    async def _load_cached(self, domain: str, name: str) -> CachedStub | None:
        key = (domain, name)
        hit = self._mirror.get(key)
        if hit is not None or key not in self._known:
            return hit
        entry = await asyncio.to_thread(self._require_cache().get, domain, name)
        if entry is None:
            self._known.discard(key)
            return None
        try:
            descriptor = parse_descriptor(entry.descriptor)
        except CatalogueError as exc:
            _log.warning("cached descriptor unreadable; ignored", domain=domain, stub=name, error=str(exc))
            return None
        hit = CachedStub(entry, descriptor)
        self._mirror[key] = hit
        return hit

    async def _remember(self, done: Done) -> None:
        cache = self._require_cache()
        stub = done.stub
        key = (stub.domain, stub.name)
        if done.store is not None:
            await asyncio.to_thread(cache.put, done.store)
            self._mirror[key] = CachedStub(done.store, stub.descriptor)
            self._known.add(key)
            self.stats.stored += 1
        elif done.refreshed is not None:
            entry = done.refreshed
            await asyncio.to_thread(
                cache.touch, entry.domain, entry.name, fresh_until=entry.fresh_until, etag=entry.etag
            )
            previous = self._mirror.get(key)
            if previous is not None:
                self._mirror[key] = CachedStub(entry, previous.descriptor)

    # -- HTTP -------------------------------------------------------------------------------------------

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "http":
            if not (self.allow_http_loopback and _is_loopback(host)):
                why = "only to loopback hosts" if self.allow_http_loopback else "only with allow_http_loopback"
                raise CatalogueError(E_INSECURE, f"refusing plain http ({why})", url=url)
        elif parts.scheme != "https":
            raise CatalogueError(E_INSECURE, f"refusing URL scheme {parts.scheme!r} (https only)", url=url)
        if self.resolver_only and host not in self._allowed_hosts:
            raise CatalogueError(E_FETCH, f"host {host!r} is not in the resolver map (resolver_only)", url=url)

    async def _get(self, action: Get) -> Response:
        session = self._session
        if session is None:
            raise RuntimeError("CatalogueClient is not open; use 'async with CatalogueClient(...)'")
        # identity: the size limit then bounds what is read, and no compressed body can expand past it.
        headers = {"Accept": "application/json, */*;q=0.5", "Accept-Encoding": "identity"}
        if action.etag:
            headers["If-None-Match"] = action.etag
        url = action.url
        for _ in range(self.max_redirects + 1):
            self._check_url(url)
            self.stats.requests += 1
            try:
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    body = await self._read(resp, url) if resp.status == 200 else b""
                    return Response(
                        url=url,
                        status=resp.status,
                        body=body,
                        etag=resp.headers.get("ETag"),
                        max_age=self._max_age(resp.headers.get("Cache-Control")),
                    )
            except CatalogueError:
                raise
            except TimeoutError:
                connect, read, total = self._timeouts
                raise CatalogueError(
                    E_FETCH, f"timed out (connect {connect} s, read {read} s, total {total} s)", url=url
                ) from None
            except aiohttp.ClientSSLError as exc:
                raise CatalogueError(E_FETCH, f"TLS verification failed: {exc}", url=url) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise CatalogueError(E_FETCH, f"{type(exc).__name__}: {exc}", url=url) from None
        raise CatalogueError(E_FETCH, f"more than {self.max_redirects} redirects", url=action.url)

    async def _read(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        limit = self.max_size
        declared = resp.content_length
        if declared is not None and declared > limit:
            resp.close()
            raise CatalogueError(E_TOO_LARGE, f"body of {declared} bytes is over the {limit}-byte limit", url=url)
        if declared is not None and not resp.headers.get("Content-Encoding"):
            body = await resp.read()  # exactly ``declared`` bytes, already checked against the limit
        else:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > limit:
                    resp.close()  # drop the connection: the rest is never read
                    raise CatalogueError(E_TOO_LARGE, f"body over the {limit}-byte limit; transfer cut off", url=url)
                chunks.append(chunk)
            body = b"".join(chunks)
        if len(body) > limit:
            raise CatalogueError(E_TOO_LARGE, f"body over the {limit}-byte limit", url=url)
        self.stats.bytes_downloaded += len(body)
        return body

    def _max_age(self, header: str | None) -> float:
        if not header:
            return 0.0
        lowered = header.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            return 0.0
        match = _MAX_AGE.search(lowered)
        return min(float(match.group(1)), self.max_age_cap) if match else 0.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def describe(stub: VerifiedStub) -> dict[str, Any]:
    """A JSON-friendly summary of a fetched stub (CLI ``fetch``, logs)."""
    return {
        "domain": stub.domain,
        "name": stub.name,
        "objectName": stub.descriptor.object_name,
        "version": stub.version or None,
        "url": stub.url,
        "sha256": stub.sha256,
        "signer": stub.signer,
        "signerDomain": stub.signer_domain,
        "fromCache": stub.from_cache,
        "revalidated": stub.revalidated,
        "offline": stub.offline,
        "warnings": list(stub.warnings),
        "timings": {k: round(v, 3) for k, v in stub.timings.as_dict().items()},
        "sourceBytes": len(stub.source),
    }
