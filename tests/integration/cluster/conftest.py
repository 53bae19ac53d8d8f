"""A three-server NATS cluster (JetStream, replicas 3) and message node *processes* clustered on it.

Everything is started here, on 127.0.0.1 with ports chosen at run time, and stopped by pid.  Clients are
the stub-like ``websockets`` clients of the message node's tests, or real runtimes (``runtimes``) whose
home stub is ``stubs/msgnode``, deployed from a real catalogue into a process sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.runtime.conftest import Domains

from protofly.config import RuntimeConfig
from protofly.msgnode.cluster.natsrun import NatsCluster, nats_server_binary
from protofly.msgnode.process import NodeProcess
from protofly.runtime import Runtime

DOMAIN = "b.test"
STUB_PACKAGE = Path(__file__).resolve().parents[3] / "stubs" / "msgnode"

if nats_server_binary() is None:
    pytest.skip("nats-server is not installed (scripts/system-deps.sh installs it)", allow_module_level=True)
if importlib.util.find_spec("nats") is None:
    pytest.skip("nats-py is not installed (pip install -e '.[cluster]')", allow_module_level=True)


async def serve_node(name: str, cluster: str, *args: str) -> NodeProcess:
    """Node ``name`` of the domain's cluster, started in its own process (``NodeStartError`` if it does not)."""
    node = NodeProcess(DOMAIN, "--ping-interval", "0", "--cluster", cluster, "--node-id", name, *args, quiet=True)
    await node.start()
    return node


@pytest.fixture
async def nats(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with NatsCluster(tmp_path / "nats") as cluster:
        yield cluster


@pytest.fixture
async def nodes(nats: NatsCluster) -> AsyncIterator[list[NodeProcess]]:
    """Three clustered node processes (n1, n2, n3), stopped (or found killed) at teardown."""
    started = await asyncio.gather(*(serve_node(f"n{i}", nats.url) for i in (1, 2, 3)))
    yield list(started)
    await asyncio.gather(*(node.stop() for node in started))


class ClusterRuntimes:
    """Real protofly runtimes of ``b.test``, each homed on one node of the cluster.

    Each runtime gets its own catalogue server for ``b.test`` (the deploy fixtures of
    ``tests/integration/runtime``), publishing ``stubs/msgnode`` signed with that catalogue's key and
    configured with the cluster's node URLs, its own node first: the stub tries the next one when its node
    goes.  The stub runs in a process sandbox and may reach the three nodes only (its signed egress).
    """

    def __init__(self, root: Path, nodes: list[NodeProcess]) -> None:
        self.root = root
        self.nodes = nodes
        self.catalogues: list[Domains] = []

    @contextlib.asynccontextmanager
    async def runtime(self, home: int, **overrides: Any) -> AsyncIterator[Runtime]:
        """A runtime whose home stub connects to ``nodes[home]`` first, then to the others in order."""
        index = len(self.catalogues)
        domains = Domains(self.root / f"catalogue-{index}")
        self.catalogues.append(domains)
        urls = [node.url for node in self.nodes[home:] + self.nodes[:home]]
        template = json.loads((STUB_PACKAGE / "descriptor.json").read_text())
        configuration = {
            **template["configuration"],
            "url": urls[0],
            "urls": urls[1:],
            "backoffBase": 0.02,
            "backoffCap": 0.2,
            "openTimeout": 2.0,
        }
        domains.publish(DOMAIN, configuration, stub=str(STUB_PACKAGE), egress=urls)
        await domains.serve(DOMAIN)
        settings: dict[str, Any] = {
            "domain": DOMAIN,
            "state_dir": self.root / f"runtime-{index}",
            "catalogues": domains.resolver(),
            "trust_store": domains.trust_file(),
            "allow_http_loopback": True,
            "resolver_only": True,
            "deploy_timeout": 10.0,
            "request_timeout": 10.0,
            "backoff_base": 0.01,
            "backoff_cap": 0.1,
            **overrides,
        }
        try:
            async with Runtime(RuntimeConfig(**settings)) as runtime:
                yield runtime
        finally:
            await domains.close()


@pytest.fixture
async def runtimes(tmp_path: Path, nodes: list[NodeProcess]) -> ClusterRuntimes:
    return ClusterRuntimes(tmp_path / "runtimes", nodes)
