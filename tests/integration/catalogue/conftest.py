"""Real catalogue servers (and misbehaving ones) on 127.0.0.1, clients, keys and published stubs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protofly.catalogue import CatalogueClient, SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer

ROOT = Path(__file__).resolve().parents[3]
ECHO = ROOT / "stubs" / "echo"
FIFTY_MIB = 50 << 20


@pytest.fixture(scope="session")
def keys() -> dict[str, SigningKey]:
    return {d: SigningKey.generate(d) for d in ("a.test", "b.test", "c.test")}


@pytest.fixture
def trust(keys) -> TrustStore:
    """a.test (the home domain) and b.test are pinned; c.test is not."""
    return TrustStore({"a.test": [keys["a.test"].public_raw], "b.test": [keys["b.test"].public_raw]})


@pytest.fixture
def echo_package(tmp_path) -> Callable[..., Path]:
    """A copy of stubs/echo with template changes and extra source lines."""

    def make(*, version: str = "1.0.0", extra_source: str = "", label: str = "pkg") -> Path:
        pkg = tmp_path / label
        if pkg.exists():
            shutil.rmtree(pkg)
        shutil.copytree(ECHO, pkg)
        template = json.loads((pkg / "descriptor.json").read_text())
        template["version"] = version
        (pkg / "descriptor.json").write_text(json.dumps(template))
        if extra_source:
            with (pkg / "stub.py").open("a") as handle:
                handle.write(extra_source)
        return pkg

    return make


@pytest.fixture
def catalogue_dir(tmp_path, keys) -> Path:
    """b.test's published directory: echo 1.0.0, signed by b.test."""
    directory = tmp_path / "b-catalogue"
    publish(ECHO, directory, keys["b.test"], "b.test")
    return directory


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as exits:
        yield exits


@pytest.fixture
def start_server(stack) -> Callable[..., Any]:
    async def start(directory: Path, **kw: Any) -> CatalogueServer:
        kw.setdefault("default", "echo")
        return await stack.enter_async_context(CatalogueServer(directory, "127.0.0.1", 0, **kw))

    return start


@pytest.fixture
def open_client(stack, trust, state_dir) -> Callable[..., Any]:
    async def open_(resolver: dict[str, str], **kw: Any) -> CatalogueClient:
        kw.setdefault("home_domain", "a.test")
        kw.setdefault("state_dir", state_dir)
        kw.setdefault("trust", trust)
        kw.setdefault("allow_http_loopback", True)
        kw.setdefault("resolver_only", True)
        kw.setdefault("read_timeout", 2.0)
        kw.setdefault("total_timeout", 5.0)
        return await stack.enter_async_context(CatalogueClient(resolver=resolver, **kw))

    return open_


# -- misbehaving servers -------------------------------------------------------------------------------


class BadServer:
    """One aiohttp server whose first path segment picks the misbehaviour (``/<mode>/.well-known/...``)."""

    def __init__(self) -> None:
        self.huge_sent = 0
        self.huge_finished = False
        self.huge_done = asyncio.Event()
        self.base = ""
        self._runner: web.AppRunner | None = None

    async def start(self, target: str = "") -> BadServer:
        self.target = target
        app = web.Application()
        app.router.add_route("GET", "/{mode}/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}"

    async def stop(self) -> None:
        if self._runner is not None:
            await asyncio.wait_for(self._runner.cleanup(), 10)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        if mode == "error500":
            return web.Response(status=500, text="Could not find instance: default")
        if mode == "garbage":
            return web.Response(body=b"<html><body>Welcome to nginx!</body></html>", content_type="text/html")
        if mode == "huge":
            return await self._huge(request)
        if mode == "declared":
            return await self._declared(request)
        if mode == "gzip":
            bomb = gzip.compress(b" " * (8 << 20), compresslevel=1)
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if mode == "loop":
            raise web.HTTPFound(location=request.path)
        if mode == "redirect":
            raise web.HTTPFound(location=self.target + "/" + request.match_info["tail"])
        return web.Response(status=404)

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b" " * (1 << 20)
        try:
            while self.huge_sent < FIFTY_MIB:
                await response.write(chunk)
                self.huge_sent += len(chunk)
            await response.write_eof()
            self.huge_finished = True
        finally:
            self.huge_done.set()
        return response

    async def _declared(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(FIFTY_MIB)})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(b"{")
        return response


@pytest.fixture
async def bad_server(stack) -> BadServer:
    server = await BadServer().start()
    stack.push_async_callback(server.stop)
    return server


class SilentServer:
    """Accepts TCP connections and never answers (the read timeout must fire)."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> SilentServer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 10)


@pytest.fixture
async def silent_server(stack) -> SilentServer:
    server = await SilentServer().start()
    stack.push_async_callback(server.stop)
    return server


@pytest.fixture
async def static_server(stack) -> Callable[..., Any]:
    """A plain static file server (not a catalogue) over a directory: the static layout only."""

    async def start(directory: Path) -> str:
        app = web.Application()
        app.router.add_static("/.well-known", directory / ".well-known")
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stack.push_async_callback(runner.cleanup)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    return start


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key)."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "protofly test catalogue")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def server_tls(tls_files) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def client_tls(tls_files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


CONFORMANCE_DEFAULT = ROOT / "tests" / "conformance" / "data" / "default.ps.json"
