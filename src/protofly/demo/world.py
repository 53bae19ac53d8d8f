"""A local reTHINK world on 127.0.0.1: per domain a signing key, a catalogue with the freshly signed message
node stub, and a message node.  The demo, the quick start and the end-to-end benchmarks build on it.

Each published stub names its node as ``ws://msg-node.<domain>:<port>/ws``, in its configuration and in its
signed ``egress`` (the only endpoint it may reach); the runtime configurations built here map those names
to 127.0.0.1 in ``hosts``, as an operator maps real names on a closed network.

Everything binds to 127.0.0.1 on ports chosen by the system, lives in one temporary directory, and is stopped
(and the directory removed) when the context exits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import protofly
from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.config import RuntimeConfig
from protofly.msgnode import MessageNode

__all__ = ["LocalDomain", "LocalDomains", "stubs_dir"]

STUB = "msgnode"


def stubs_dir() -> Path:
    """The published stub packages: ``$PROTOFLY_STUBS_DIR``, else ``stubs/`` of this source checkout."""
    override = os.environ.get("PROTOFLY_STUBS_DIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path(protofly.__file__).resolve().parents[2] / "stubs")
    for candidate in candidates:
        if (candidate / STUB / "stub.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"cannot find the stub packages (looked in {', '.join(map(str, candidates))}); set PROTOFLY_STUBS_DIR"
    )


class LocalDomain:
    """One domain: its key, its catalogue server and its message node (restartable on the same port)."""

    def __init__(self, name: str, root: Path, trust: TrustStore) -> None:
        self.name = name
        self.root = root
        self.key = SigningKey.generate(name)
        trust.add(name, self.key.public_raw)
        self.catalogue = CatalogueServer(root / "catalogue", default="default")
        self.node: MessageNode | None = None
        self.node_port = 0
        self.state_file = root / "node-state.json"

    @property
    def node_url(self) -> str:
        """Where the node listens (what a client in this process connects to)."""
        return f"ws://127.0.0.1:{self.node_port}/ws"

    @property
    def node_host(self) -> str:
        """The name the published stub knows its node by (mapped to 127.0.0.1 by the runtime's ``hosts``)."""
        return f"msg-node.{self.name}"

    @property
    def published_node_url(self) -> str:
        """The node's URL in the published stub's configuration and ``egress``."""
        return f"ws://{self.node_host}:{self.node_port}/ws"

    async def start(self, stub_package: Path, stub_settings: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await self.start_node()
        package = self.root / "package"
        shutil.copytree(stub_package, package)
        template = json.loads((package / "descriptor.json").read_text())
        template["objectName"] = "default"
        template["configuration"] = {
            **template.get("configuration", {}),
            **stub_settings,
            "url": self.published_node_url,
        }
        template["egress"] = [self.published_node_url]
        (package / "descriptor.json").write_text(json.dumps(template, indent=2))
        publish(package, self.root / "catalogue", self.key, self.name)
        await self.catalogue.start()

    async def start_node(self) -> None:
        node = MessageNode(self.name, "127.0.0.1", self.node_port, state_file=self.state_file)
        await node.start()
        self.node, self.node_port = node, node.port

    async def stop_node(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            await node.stop()

    async def stop(self) -> None:
        await self.stop_node()
        await self.catalogue.stop()


class LocalDomains:
    """``async with LocalDomains("a.test", "b.test") as world: world.config("a.test")``."""

    def __init__(self, *names: str, root: Path | None = None, stub_settings: dict[str, Any] | None = None) -> None:
        if not names:
            raise ValueError("name at least one domain")
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="protofly-")) if root is None else Path(root)
        self.trust = TrustStore()
        self.domains = {name: LocalDomain(name, self.root / name, self.trust) for name in names}
        self.stub_settings = dict(stub_settings or {})

    def __getitem__(self, name: str) -> LocalDomain:
        return self.domains[name]

    @property
    def trust_file(self) -> Path:
        return self.root / "trust.json"

    async def __aenter__(self) -> LocalDomains:
        package = stubs_dir() / STUB
        try:
            for domain in self.domains.values():
                await domain.start(package, self.stub_settings)
            self.trust.save(self.trust_file)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for domain in self.domains.values():
            await domain.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def config(self, domain: str, **overrides: Any) -> RuntimeConfig:
        """A runtime of ``domain`` that finds every local domain's catalogue and trusts every local key."""
        settings: dict[str, Any] = {
            "domain": domain,
            "state_dir": self.root / "runtimes" / domain,
            "catalogues": {name: d.catalogue.base_url for name, d in self.domains.items()},
            "trust_store": self.trust_file,
            "allow_http_loopback": True,
            "resolver_only": True,
            "hosts": {d.node_host: "127.0.0.1" for d in self.domains.values()},
        }
        settings.update(overrides)
        return RuntimeConfig(**settings)
