"""JavaScript stubs through the full runtime path: real message nodes, real catalogues, Node sandbox hosts.

The reTHINK artefacts are the published ones vendored under ``tests/conformance/data`` (see SOURCES.md
there): ``default.ps.js``/``default.ps.json`` (the gen-2 Vert.x stub of reTHINK's dev-protostubs) and
``VertxProtoStub.description.json`` (the gen-1 catalogue package).  Test stubs of our own are in
``stubs/``.  A catalogue here is a directory published with :func:`protofly.catalogue.publish` (signed by
the domain's key) or written in reTHINK's own unsigned static layout, served by a real
:class:`CatalogueServer`; each runtime gets its own resolver map, so two runtimes of one domain can
deploy different stubs for it (runtime A reTHINK's JavaScript stub, runtime B protofly's Python stub).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.config import RuntimeConfig
from protofly.msgnode import MessageNode
from protofly.runtime import Runtime
from protofly.sandbox.node import INSTALL_HINT, node_executable, node_modules

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "conformance" / "data"
STUBS = Path(__file__).parent / "stubs"
MSGNODE_STUB = ROOT / "stubs" / "msgnode"


def node_problem() -> str | None:
    """Why JavaScript stubs cannot run on this machine (the tests then skip saying so), or None."""
    node = node_executable()
    if node is None:
        return f"Node.js is not installed ({INSTALL_HINT})"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if node_modules() is None:  # the stub's WebSocket is ws's, connected through the runtime's broker
        return f"Node {version}: the pinned 'ws' is not installed ({INSTALL_HINT})"
    return None


@pytest.fixture(autouse=True)
def _needs_node() -> None:
    problem = node_problem()
    if problem is not None:
        pytest.skip(problem)


def rethink_descriptor(node_url: str, **changes: Any) -> dict[str, Any]:
    """reTHINK's published default.ps.json, pointed at our node (its configuration is the only change)."""
    descriptor = json.loads((DATA / "default.ps.json").read_text())
    descriptor["configuration"] = {**descriptor["configuration"], "url": node_url}
    descriptor.update(changes)
    return descriptor


class JsWorld:
    """Message nodes, signing keys and catalogue directories/servers, created on demand by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trust = TrustStore()
        self.keys: dict[str, SigningKey] = {}
        self.nodes: dict[str, MessageNode] = {}
        self.catalogues: dict[str, CatalogueServer] = {}
        self._runtimes = 0

    def key(self, domain: str) -> SigningKey:
        if domain not in self.keys:
            self.keys[domain] = SigningKey.generate(domain)
            self.trust.add(domain, self.keys[domain].public_raw)
        return self.keys[domain]

    async def node(self, domain: str) -> MessageNode:
        if domain not in self.nodes:
            node = MessageNode(domain, port=0)
            await node.start()
            self.nodes[domain] = node
        return self.nodes[domain]

    def publish_package(
        self, catalogue: str, domain: str, template: dict[str, Any], source: Path, *, version: str = "1.0.0"
    ) -> Path:
        """Sign and publish ``source`` with ``template`` as ``domain``'s stub into catalogue ``catalogue``."""
        package = self.root / "packages" / f"{catalogue}-{domain}-{template.get('objectName', 'default')}"
        package.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, package / source.name)
        (package / "descriptor.json").write_text(
            json.dumps({"objectName": "default", "version": version, **template, "sourceFile": source.name})
        )
        return publish(package, self.root / catalogue, self.key(domain), domain)

    async def publish_rethink(self, catalogue: str, domain: str) -> None:
        """reTHINK's gen-2 Vert.x stub, unmodified, signed by ``domain`` for its node."""
        node = await self.node(domain)
        # reTHINK's descriptor, plus the one endpoint the stub needs, opened for it by the runtime's broker
        self.publish_package(catalogue, domain, rethink_descriptor(node.url, egress=[node.url]), DATA / "default.ps.js")

    async def publish_msgnode(self, catalogue: str, domain: str) -> None:
        """protofly's Python stub for ``domain``'s node."""
        node = await self.node(domain)
        template = json.loads((MSGNODE_STUB / "descriptor.json").read_text())
        template["configuration"] = {**template["configuration"], "url": node.url}
        template["egress"] = [node.url]  # the Python stub reaches its node through the runtime's broker
        self.publish_package(catalogue, domain, template, MSGNODE_STUB / "stub.py")

    def publish_js(
        self, catalogue: str, domain: str, source: Path, configuration: dict[str, Any], **extra: Any
    ) -> None:
        template = {"language": "javascript", "configuration": configuration, **extra}
        self.publish_package(catalogue, domain, template, source)

    async def serve(self, catalogue: str) -> str:
        if catalogue not in self.catalogues:
            server = CatalogueServer(self.root / catalogue, default="default")
            await server.start()
            self.catalogues[catalogue] = server
        return self.catalogues[catalogue].base_url

    @contextlib.asynccontextmanager
    async def runtime(self, domain: str, resolver: dict[str, str], **overrides: Any) -> AsyncIterator[Runtime]:
        self._runtimes += 1
        trust_file = self.root / "trust.json"
        self.trust.save(trust_file)
        settings: dict[str, Any] = {
            "domain": domain,
            "state_dir": self.root / f"runtime-{self._runtimes}",
            "catalogues": resolver,
            "trust_store": trust_file,
            "allow_http_loopback": True,
            "resolver_only": True,
            "deploy_timeout": 10.0,
            "request_timeout": 10.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.1,
        }
        settings.update(overrides)
        async with Runtime(RuntimeConfig(**settings)) as runtime:
            yield runtime

    async def close(self) -> None:
        for server in self.catalogues.values():
            await server.stop()
        for node in self.nodes.values():
            await node.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[JsWorld]:
    js_world = JsWorld(tmp_path / "world")
    yield js_world
    await js_world.close()
