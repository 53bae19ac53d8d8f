"""Two domains on 127.0.0.1, each with its own signed catalogue and message node, and runtimes in either.

``a.test`` and ``b.test`` each publish ``stubs/msgnode`` (signed with the domain's own key, configured with
the URL of the domain's own node) and serve it from their own catalogue server.  Every runtime gets both
catalogues in its resolver map and both keys in its trust store, so it deploys whichever domain's stub it
needs on the fly, in a process sandbox, exactly as in production.  Nothing is imported from other test
areas: this is the same approach as ``tests/integration/runtime/conftest.py``, written for two nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
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


class NodeProcess:
    """A message node in its own process (``protofly msg-node serve --state-dir``), to be SIGKILLed.

    Same ``url``/``port``/``stop()`` as :class:`MessageNode` for :class:`World`; :meth:`kill` sends SIGKILL
    to its pid and :meth:`restart` starts a new process on the same port with the same state directory.
    """

    def __init__(self, domain: str, state_dir: Path, port: int, **options: Any) -> None:
        self.domain = domain
        self.state_dir = state_dir
        self.port = port
        self.options = options
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        args = [f"--{key.replace('_', '-')}={value}" for key, value in self.options.items()]
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "protofly.cli", "msg-node", "serve", "--domain", self.domain),
            *("--port", str(self.port), "--state-dir", str(self.state_dir), "--ping-interval", "0", *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=15)
        assert line.decode().strip() == self.url, line

    async def kill(self) -> None:
        proc = self.proc
        assert proc is not None and proc.returncode is None
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=10)

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class World:
    """The two domains: keys, published catalogues, catalogue servers and message nodes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trust = TrustStore()
        self.keys: dict[str, SigningKey] = {}
        self.catalogues: dict[str, CatalogueServer] = {}
        self.nodes: dict[str, Any] = {}
        self._runtimes = 0

    async def start(
        self,
        *,
        stub_config: dict[str, Any] | None = None,
        per_domain: dict[str, dict[str, Any]] | None = None,
        processes: tuple[str, ...] = (),
        **node_options: Any,
    ) -> None:
        """Nodes (``node_options`` for both, ``per_domain`` for one), keys, published stubs, catalogues.

        The nodes of ``processes`` run as separate processes with durable state (:class:`NodeProcess`).
        """
        for domain in DOMAINS:
            if domain in processes:
                state_dir = self.root / f"node-{domain}"
                state_dir.mkdir(parents=True, exist_ok=True)
                node = NodeProcess(domain, state_dir, free_port(), **(per_domain or {}).get(domain, {}))
                await node.start()
                self.nodes[domain] = node
            else:
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
