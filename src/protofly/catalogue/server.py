"""A catalogue server for a directory of published stubs (``protofly catalogue serve``).

The directory is what :func:`protofly.catalogue.publish.publish` writes, i.e. reTHINK's static layout:
``<dir>/.well-known/protocolstub/<name>.ps.json`` plus the source next to it (``<name>.ps.py``, or
``<name>.ps.js`` for JavaScript stubs).  From it the server derives, once per (re)load, every response
of both layouts as prebuilt bytes with a strong ETag, so a request costs a dictionary lookup:

=====================================================  ==============================================
``GET /.well-known/protocolstub``                      JSON array of stub names
``GET /.well-known/protocolstub/<name>``               descriptor with the source embedded (catalogue
                                                       layout); ``default`` is the configured alias
``GET /.well-known/protocolstub/<name>/<field>``       one field (primitives as raw text, like reTHINK)
``GET /.well-known/sourcepackage/<class>``             the source package object
``GET /.well-known/protocolstub/<name>.ps.json``       the descriptor file as published (static layout)
``GET /.well-known/protocolstub/<name>.ps.py``         the source (static layout)
=====================================================  ==============================================

``protostub`` is accepted for ``protocolstub``.  ``If-None-Match`` gives ``304``; unknown paths ``404``
and every other method (``CONNECT``, ``OPTIONS`` and unknown ones included) ``405`` with
``Allow: GET, HEAD``, both with a JSON body (reTHINK's broker answers ``500`` with plain text); request
lines and headers are bounded (``414``/``431``), and a request head not complete within
``header_timeout`` seconds is answered ``408`` and closed (:mod:`protofly.catalogue.httpserve`).  The
signature stays valid in every form because it does not cover ``sourcePackage.sourceCode``/``encoding``
(see :mod:`protofly.catalogue.signing`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from protofly.catalogue.errors import E_DIGEST, CatalogueError
from protofly.catalogue.httpserve import HttpResponse, HttpServer, RequestHead
from protofly.catalogue.model import ProtocolStubDescriptor, parse_descriptor, sha256_hex
from protofly.log import get_logger

__all__ = ["CONFIG_FILE", "CatalogueServer", "load_directory"]

#: Optional server config in the served directory: ``{"default": "<name>", "maxAge": 0}``.
CONFIG_FILE = "catalogue.json"
WELL_KNOWN = ".well-known"
_TYPES = ("protocolstub", "protostub")
_UNKNOWN = "(unknown)"
_JSON = "application/json"
_SOURCE_TYPES = {".ps.py": "text/x-python; charset=utf-8", ".ps.js": "application/javascript; charset=utf-8"}

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry:
    body: bytes
    etag: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Stub:
    name: str
    descriptor: ProtocolStubDescriptor
    static_body: bytes
    source: bytes | None
    source_suffix: str | None


@dataclass(slots=True)
class Loaded:
    """Everything one (re)load produced: the stubs, the default alias and the problems found."""

    stubs: dict[str, _Stub]
    default: str | None
    max_age: int | None
    problems: list[str]


def load_directory(directory: Path) -> Loaded:
    """Read a published directory (blocking: call it in a thread).

    A descriptor that does not parse is skipped and reported in ``problems`` with the field at fault, so
    one bad file does not take the catalogue down.  A source that does not match its descriptor's
    ``sha256`` is reported but served: clients refuse it (``E_DIGEST``), and only they can be trusted to.
    """
    root = Path(directory)
    config = _read_config(root)
    folder = root / WELL_KNOWN / "protocolstub"
    stubs: dict[str, _Stub] = {}
    problems: list[str] = list(config.pop("_problems", []))
    for path in sorted(folder.glob("*.ps.json")) if folder.is_dir() else []:
        name = path.name[: -len(".ps.json")]
        try:
            stubs[name] = _load_stub(path, name, problems)
        except (CatalogueError, OSError) as exc:
            problems.append(f"{path}: skipped: {exc}")
    default = config.get("default")
    max_age = config.get("maxAge")
    return Loaded(
        stubs, default if isinstance(default, str) else None, max_age if isinstance(max_age, int) else None, problems
    )


def _read_config(root: Path) -> dict[str, Any]:
    path = root / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8, an integer of 5,000 digits
        return {"_problems": [f"{path}: unreadable config ({exc})"]}
    except RecursionError:
        return {"_problems": [f"{path}: unreadable config (nested too deeply)"]}
    return data if isinstance(data, dict) else {"_problems": [f"{path}: expected a JSON object"]}


def _load_stub(path: Path, name: str, problems: list[str]) -> _Stub:
    body = path.read_bytes()
    descriptor = parse_descriptor(body, url=str(path))
    suffixes = (".ps.py", ".ps.js") if descriptor.is_python else (".ps.js", ".ps.py")
    for suffix in suffixes:
        source_path = path.with_name(name + suffix)
        if source_path.is_file():
            source = source_path.read_bytes()
            expected = descriptor.source_sha256
            if expected is not None and sha256_hex(source) != expected:
                # Served anyway: the catalogue is not the trust anchor, the runtime is, and it refuses this
                # entry with E_DIGEST (which is what a tampered or half-updated catalogue must look like).
                problems.append(f"{source_path}: does not match sourcePackage.sha256 ({E_DIGEST}; republish it)")
            return _Stub(name, descriptor, body, source, suffix)
    embedded = descriptor.source_package
    if embedded is not None and embedded.embedded:
        source, _warning = embedded.decode()
        return _Stub(name, descriptor, body, source, None)
    return _Stub(name, descriptor, body, None, None)


class CatalogueServer:
    """The catalogue HTTP server; ``async with CatalogueServer(dir) as server: server.base_url``.

    ``requests`` counts requests per path (unknown paths share one bucket) and ``responses`` per
    ``(path, status)``, which is how tests prove that a ``304`` did not send the body again.
    """

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        default: str | None = None,
        max_age: int | None = None,
        max_line_size: int = 4096,
        max_field_size: int = 4096,
        max_headers: int = 64,
        header_timeout: float = 10.0,
        idle_timeout: float = 75.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.requests: Counter[str] = Counter()
        self.responses: Counter[tuple[str, int]] = Counter()
        self.problems: list[str] = []
        self._default_override = default
        self._max_age_override = max_age
        #: Seconds from a request's first byte to the end of its head (then ``408`` and close), and seconds
        #: a keep-alive connection may stay idle between requests.
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self._limits = {"max_line_size": max_line_size, "max_field_size": max_field_size, "max_headers": max_headers}
        self._routes: dict[str, _Entry] = {}
        self._names: list[str] = []
        self._http: HttpServer | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def names(self) -> list[str]:
        return list(self._names)

    async def __aenter__(self) -> CatalogueServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        await self.reload()
        limits = self._limits
        http = HttpServer(
            self._handle,
            self.host,
            self.port,
            ssl_context=self.ssl_context,
            max_line_size=limits["max_line_size"],
            max_field_size=limits["max_field_size"],
            max_headers=limits["max_headers"],
            header_timeout=self.header_timeout,
            idle_timeout=self.idle_timeout,
            on_error=self._count_refusal,
        )
        await http.start()
        self._http = http
        self.port = http.port
        _log.info("catalogue serving", url=self.base_url, directory=str(self.directory), stubs=len(self._names))

    @property
    def connections(self) -> int:
        """Open client connections (tests await it; a leak shows here)."""
        return 0 if self._http is None else self._http.connections

    async def stop(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close(timeout=10)

    async def reload(self) -> list[str]:
        """Re-read the directory (after a publish) and swap in the new responses; return the problems."""
        loaded = await asyncio.to_thread(load_directory, self.directory)
        default = self._default_override or loaded.default
        max_age = self._max_age_override if self._max_age_override is not None else (loaded.max_age or 0)
        self._routes = _build_routes(loaded, default, max_age)
        self._names = sorted(loaded.stubs)
        self.problems = loaded.problems
        for problem in loaded.problems:
            _log.error("catalogue entry skipped", problem=problem)
        if default and default not in loaded.stubs:
            self.problems.append(f"default alias {default!r} names no published stub")
        return self.problems

    # -- request handling -------------------------------------------------------------------------------

    def _handle(self, request: RequestHead) -> HttpResponse:
        path = request.path
        entry = None if path is None else (self._routes.get(path) or self._routes.get(path.rstrip("/")))
        bucket = path if entry is not None and path is not None else _UNKNOWN
        self.requests[bucket] += 1
        if request.method not in ("GET", "HEAD"):
            description = f"method {request.method} is not allowed"
            return self._error(bucket, 405, description, {"Allow": "GET, HEAD"})
        if entry is None:
            return self._error(bucket, 404, f"no catalogue object at {request.target}")
        match = request.headers.get("if-none-match")
        if match is not None and _etag_matches(match, entry.etag):
            self.responses[bucket, 304] += 1
            return HttpResponse(304, b"", {k: v for k, v in entry.headers.items() if k != "Content-Type"})
        self.responses[bucket, 200] += 1
        return HttpResponse(200, entry.body, entry.headers)

    def _error(self, bucket: str, status: int, description: str, headers: dict[str, str] | None = None) -> HttpResponse:
        self.responses[bucket, status] += 1
        body = msgspec.json.encode({"code": status, "error": _REASONS[status], "description": description})
        return HttpResponse(status, body, {"Content-Type": _JSON, **(headers or {})})

    def _count_refusal(self, status: int) -> None:
        """A request the transport answered itself (malformed head, header timeout): counted, never routed."""
        self.requests[_UNKNOWN] += 1
        self.responses[_UNKNOWN, status] += 1


_REASONS = {404: "not found", 405: "method not allowed"}


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _entry(body: bytes, content_type: str, cache_control: str) -> _Entry:
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {
        "Content-Type": content_type,
        "ETag": etag,
        "Cache-Control": cache_control,
        "Access-Control-Allow-Origin": "*",
    }
    return _Entry(body, etag, headers)


def _field_body(value: Any) -> tuple[bytes, str]:
    """reTHINK serves a primitive field as raw text (``1.0``, not ``"1.0"``) and containers as JSON."""
    if isinstance(value, dict | list):
        return msgspec.json.encode(value), _JSON
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    return msgspec.json.encode(value), "text/plain; charset=utf-8"


def _package(stub: _Stub) -> dict[str, Any] | None:
    raw = stub.descriptor.raw.get("sourcePackage")
    package = dict(raw) if isinstance(raw, dict) else {}
    if stub.source is None:
        return package or None
    try:
        package["sourceCode"] = stub.source.decode("utf-8")
        package["encoding"] = "utf-8"
    except UnicodeDecodeError:
        package["sourceCode"] = base64.b64encode(stub.source).decode("ascii")
        package["encoding"] = "base64"
    return package


def _build_routes(loaded: Loaded, default: str | None, max_age: int) -> dict[str, _Entry]:
    cache_control = f"public, max-age={max_age}" if max_age > 0 else "no-cache"
    routes: dict[str, _Entry] = {}
    names = sorted(loaded.stubs)
    aliases = {name: [name] for name in names}
    if default and default in loaded.stubs:
        aliases[default] = [*aliases[default], "default"]
    listing = _entry(msgspec.json.encode(names), _JSON, cache_control)
    for kind in _TYPES:
        routes[f"/{WELL_KNOWN}/{kind}"] = listing
    routes[f"/{WELL_KNOWN}"] = _entry(msgspec.json.encode(["protocolstub", "sourcepackage"]), _JSON, cache_control)
    for name, stub in loaded.stubs.items():
        catalogue = dict(stub.descriptor.raw)
        package = _package(stub)
        if package is not None:
            catalogue["sourcePackage"] = package
        full = _entry(msgspec.json.encode(catalogue), _JSON, cache_control)
        static = _entry(stub.static_body, _JSON, cache_control)
        fields = {key: _entry(*_field_body(value), cache_control) for key, value in catalogue.items()}
        source = (
            _entry(stub.source, _SOURCE_TYPES[stub.source_suffix], cache_control)
            if stub.source is not None and stub.source_suffix
            else None
        )
        for alias in aliases[name]:
            for kind in _TYPES:
                prefix = f"/{WELL_KNOWN}/{kind}/{alias}"
                routes[prefix] = full
                routes[f"{prefix}.ps.json"] = static
                for key, entry in fields.items():
                    routes[f"{prefix}/{key}"] = entry
                if source is not None and stub.source_suffix:
                    routes[f"{prefix}{stub.source_suffix}"] = source
        if package is not None:
            key = stub.descriptor.source_classname or name
            routes[f"/{WELL_KNOWN}/sourcepackage/{key}"] = _entry(msgspec.json.encode(package), _JSON, cache_control)
            for field_name, value in package.items():
                routes[f"/{WELL_KNOWN}/sourcepackage/{key}/{field_name}"] = _entry(*_field_body(value), cache_control)
    return routes
