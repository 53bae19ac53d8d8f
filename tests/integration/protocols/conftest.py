"""Fixtures for the interworking stubs: real Prosody and Mosquitto, real catalogues, real runtimes.

The servers are started by the tests on ports chosen at run time and stopped by their own pid
(:mod:`protofly.demo.backends`); the stubs are the published packages of ``stubs/``, signed and served by a
catalogue and deployed through the runtime's full path.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.integration.protocols.clients import STUBS

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.config import RuntimeConfig
from protofly.demo.backends import Mosquitto, Prosody, missing_servers
from protofly.runtime import Runtime


def _need(server: str) -> None:
    if server in missing_servers():
        pytest.skip(f"{server} is not installed (scripts/system-deps.sh installs it as root)")


class Catalogues:
    """Per domain a key, a signed package of one of ``stubs/`` and a catalogue server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trust = TrustStore()
        self.servers: dict[str, CatalogueServer] = {}
        self.keys: dict[str, SigningKey] = {}

    async def publish(self, domain: str, stub: str, configuration: dict[str, Any], **fields: Any) -> None:
        key = self.keys.setdefault(domain, SigningKey.generate(domain))
        self.trust.add(domain, key.public_raw)
        package = self.root / "packages" / domain
        shutil.rmtree(package, ignore_errors=True)
        shutil.copytree(STUBS / stub, package)
        template = json.loads((package / "descriptor.json").read_text())
        template["configuration"] = {**template["configuration"], **configuration}
        template["egress"] = [configuration["server"]]
        template.update(fields)
        (package / "descriptor.json").write_text(json.dumps(template))
        publish(package, self.root / domain, key, domain, version="1.0.0")
        if domain not in self.servers:
            server = CatalogueServer(self.root / domain, default="default")
            await server.start()
            self.servers[domain] = server

    async def close(self) -> None:
        for server in self.servers.values():
            await server.stop()


@pytest.fixture
async def catalogues(tmp_path: Path) -> AsyncIterator[Catalogues]:
    world = Catalogues(tmp_path / "world")
    yield world
    await world.close()


@pytest.fixture
async def prosody(tmp_path: Path) -> AsyncIterator[Prosody]:
    _need("prosody")
    server = Prosody(tmp_path / "prosody")
    for user in ("alice", "bob", "carol"):
        await server.register(user, f"{user}-pw")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    _need("mosquitto")
    server = Mosquitto(tmp_path / "mosquitto")
    for user in ("runtime", "sensor"):
        await server.add_user(user, f"{user}-pw")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def runtime_factory(
    tmp_path: Path, catalogues: Catalogues
) -> Callable[..., contextlib.AbstractAsyncContextManager[Runtime]]:
    @contextlib.asynccontextmanager
    async def make(credentials: dict[str, Any] | None = None, **overrides: Any) -> AsyncIterator[Runtime]:
        trust = tmp_path / "trust.json"
        catalogues.trust.save(trust)
        settings: dict[str, Any] = {
            "domain": "a.test",
            "state_dir": tmp_path / "runtime-state",
            "catalogues": {d: s.base_url for d, s in catalogues.servers.items()},
            "trust_store": trust,
            "allow_http_loopback": True,
            "resolver_only": True,
            "deploy_timeout": 10.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
        }
        if credentials is not None:
            path = tmp_path / "credentials.json"
            path.write_text(json.dumps(credentials))
            settings["credentials_file"] = path
        settings.update(overrides)
        async with Runtime(RuntimeConfig(**settings)) as runtime:
            yield runtime

    return make
