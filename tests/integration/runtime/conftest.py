"""Fixtures for the deploy flow: a real TCP back-end, real catalogue servers with signed stubs, real runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.config import RuntimeConfig
from protofly.runtime import Runtime

STUBS = Path(__file__).parent / "stubs"


class LineBackend:
    """A TCP server speaking JSON lines: echoes every message back as a 200 response."""

    def __init__(self) -> None:
        self.hellos: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.crash_on_hello = False
        self.writers: list[asyncio.StreamWriter] = []
        self.hello_event = asyncio.Event()
        self.received_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self.writers:
                writer.close()
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def wait_hellos(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.hellos) < count:
                self.hello_event.clear()
                await self.hello_event.wait()

    async def wait_received(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self.received_event.clear()
                await self.received_event.wait()

    def crash_all(self) -> None:
        for writer in self.writers:
            if not writer.is_closing():
                writer.write(b'{"command": "crash"}\n')

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            hello = json.loads(await reader.readline())
            self.hellos.append(hello)
            self.hello_event.set()
            if self.crash_on_hello:
                writer.write(b'{"command": "crash"}\n')
            while line := await reader.readline():
                msg = json.loads(line)
                self.received.append(msg)
                self.received_event.set()
                if msg.get("type") != "response":
                    answer = {
                        "id": msg.get("id"),
                        "type": "response",
                        "from": msg["to"],
                        "to": msg["from"],
                        "body": {"code": 200, "value": msg.get("body")},
                    }
                    writer.write(json.dumps(answer).encode() + b"\n")
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def backend() -> AsyncIterator[LineBackend]:
    server = LineBackend()
    await server.start()
    yield server
    await server.stop()


class Domains:
    """Per test domain: a signing key, a published catalogue directory and a running catalogue server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.trust = TrustStore()
        self.servers: dict[str, CatalogueServer] = {}
        self.keys: dict[str, SigningKey] = {}

    def key(self, domain: str) -> SigningKey:
        if domain not in self.keys:
            self.keys[domain] = SigningKey.generate(domain)
            self.trust.add(domain, self.keys[domain].public_raw)
        return self.keys[domain]

    def publish(
        self,
        domain: str,
        configuration: dict[str, Any],
        *,
        version: str = "1.0.0",
        stub: str = "lines",
        fields: dict[str, Any] | None = None,
    ) -> Path:
        package = self.root / "packages" / f"{domain}-{version}"
        shutil.copytree(STUBS / stub, package, dirs_exist_ok=True)
        template = json.loads((package / "descriptor.json").read_text())
        template["configuration"] = configuration
        template["objectName"] = "default"
        template.update(fields or {})
        (package / "descriptor.json").write_text(json.dumps(template))
        return publish(package, self.root / domain, self.key(domain), domain, version=version)

    async def serve(self, domain: str) -> CatalogueServer:
        server = CatalogueServer(self.root / domain, default="default")
        await server.start()
        self.servers[domain] = server
        return server

    async def reload(self, domain: str) -> None:
        await self.servers[domain].reload()

    def resolver(self) -> dict[str, str]:
        return {domain: server.base_url for domain, server in self.servers.items()}

    def trust_file(self) -> Path:
        path = self.root / "trust.json"
        self.trust.save(path)
        return path

    async def close(self) -> None:
        for server in self.servers.values():
            await server.stop()


@pytest.fixture
async def domains(tmp_path: Path) -> AsyncIterator[Domains]:
    world = Domains(tmp_path / "world")
    yield world
    await world.close()


@pytest.fixture
def runtime_factory(tmp_path: Path, domains: Domains) -> Callable[..., contextlib.AbstractAsyncContextManager[Runtime]]:
    @contextlib.asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Runtime]:
        settings: dict[str, Any] = {
            "domain": "a.test",
            "state_dir": tmp_path / "runtime-state",
            "catalogues": domains.resolver(),
            "trust_store": domains.trust_file(),
            "allow_http_loopback": True,
            "resolver_only": True,
            "deploy_timeout": 10.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
        }
        settings.update(overrides)
        async with Runtime(RuntimeConfig(**settings)) as runtime:
            yield runtime

    return make
