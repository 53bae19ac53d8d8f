"""Two domains on 127.0.0.1, each with its own signed catalogue and message node, and runtimes in either.

``a.test`` and ``b.test`` each publish ``stubs/msgnode`` (signed with the domain's own key, configured with
the URL of the domain's own node) and serve it from their own catalogue server.  Every runtime gets both
catalogues in its resolver map and both keys in its trust store, so it deploys whichever domain's stub it
needs on the fly, in a process sandbox, exactly as in production.  Nothing is imported from other test
areas: this is the same approach as ``tests/integration/runtime/conftest.py``, written for two nodes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.config import RuntimeConfig
from protofly.msgnode import MessageNode
from protofly.runtime import Runtime

STUB_PACKAGE = Path(__file__).resolve().parents[3] / "stubs" / "msgnode"
DOMAINS = ("a.test", "b.test")


class World:
    """The two domains: keys, published catalogues, catalogue servers and message nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trust = TrustStore()
        self.keys: dict[str, SigningKey] = {}
        self.catalogues: dict[str, CatalogueServer] = {}
        self.nodes: dict[str, MessageNode] = {}
        self._runtimes = 0

    async def start(
        self,
        *,
        stub_config: dict[str, Any] | None = None,
        per_domain: dict[str, dict[str, Any]] | None = None,
        **node_options: Any,
    ) -> None:
        """Nodes (``node_options`` for both, ``per_domain`` for one), keys, published stubs, catalogues."""
        for domain in DOMAINS:
            await self.start_node(domain, **node_options, **(per_domain or {}).get(domain, {}))
            self.keys[domain] = key = SigningKey.generate(domain)
            self.trust.add(domain, key.public_raw)
            self.publish(domain, stub_config or {})
            server = CatalogueServer(self.root / domain, default="default")
            await server.start()
            self.catalogues[domain] = server

    async def start_node(self, domain: str, *, port: int = 0, **options: Any) -> MessageNode:
        node = MessageNode(domain, port=port, **options)
        await node.start()
        self.nodes[domain] = node
        return node

    def publish(self, domain: str, extra: dict[str, Any]) -> Path:
        """Publish the stub package for ``domain``, pointing at that domain's node."""
        package = self.root / "packages" / domain
        shutil.copytree(STUB_PACKAGE, package, dirs_exist_ok=True)
        template = json.loads((package / "descriptor.json").read_text())
        template["configuration"] = {
            **template["configuration"],
            "url": self.nodes[domain].url,
            "backoffBase": 0.02,
            "backoffCap": 0.2,
            **extra,
        }
        # The stub reaches nothing but what its signed descriptor declares (a URL with a path is one endpoint).
        template["egress"] = [self.nodes[domain].url]
        (package / "descriptor.json").write_text(json.dumps(template))
        return publish(package, self.root / domain, self.keys[domain], domain)

    @contextlib.asynccontextmanager
    async def runtime(self, domain: str, **overrides: Any) -> AsyncIterator[Runtime]:
        self._runtimes += 1
        trust_file = self.root / "trust.json"
        self.trust.save(trust_file)
        settings: dict[str, Any] = {
            "domain": domain,
            "state_dir": self.root / f"runtime-{self._runtimes}",
            "catalogues": {d: server.base_url for d, server in self.catalogues.items()},
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
async def world(tmp_path: Path) -> AsyncIterator[World]:
    domains = World(tmp_path / "world")
    yield domains
    await domains.close()
