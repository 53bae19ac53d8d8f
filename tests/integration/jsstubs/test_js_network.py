"""Network as a capability for JavaScript stubs, through the full runtime path: a signed stub served by a
catalogue, deployed in a Node host inside bubblewrap with a network namespace of its own.  The stub
(stubs/net_probe.js) tries its brokered globals (WebSocket, fetch) and, escaping its vm context, Node's own
modules; the runtime must open only what the descriptor declares and count every refusal.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from protofly.message import Message, response_code
from protofly.sandbox.isolation import probe

from .conftest import STUBS, JsWorld


@pytest.fixture(autouse=True)
async def _needs_network_namespace() -> None:
    found = await probe()
    if not found.network:
        pytest.skip(f"no network namespace on this machine: {'; '.join(found.missing)}")


class Counting:
    """A TCP server on 127.0.0.1 that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Counting:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()


@pytest.fixture
async def other() -> AsyncIterator[Counting]:
    async with Counting() as server:
        yield server


def host_view(path: str) -> str:
    """A /proc/net file as the test process (in the host's network namespace) sees it."""
    return Path(path).read_text()


async def ask(runtime: Any, domain: str, **body: Any) -> dict[str, Any]:
    question = Message(type="read", from_="hyperty://y.test/me", to=f"hyperty://{domain}/anyone", body=body)
    answer = await runtime.bus.request(question, timeout=30)
    assert response_code(answer) == 200, answer.body
    return dict(answer.body["value"])


async def test_a_js_stub_opens_only_what_it_declares_and_the_runtime_counts_the_rest(
    world: JsWorld, other: Counting
) -> None:
    node = await world.node("x.test")
    node_port = urlsplit(node.url).port
    catalogue = await world.serve("cat")  # serves the stub, and is the HTTP server fetch reaches
    catalogue_port = urlsplit(catalogue).port
    declared = [f"ws://node.b.test:{node_port}/ws", f"http://cat.b.test:{catalogue_port}"]
    world.publish_js("cat", "b.test", STUBS / "net_probe.js", {}, egress=declared)
    await world.catalogues["cat"].reload()
    hosts = {"node.b.test": "127.0.0.1", "cat.b.test": "127.0.0.1"}
    async with world.runtime("y.test", {"b.test": catalogue}, hosts=hosts) as runtime:
        result = await ask(
            runtime,
            "b.test",
            ws=[
                f"ws://node.b.test:{node_port}/ws",  # declared: opened by the runtime, mapped to 127.0.0.1
                f"ws://node.b.test:{other.port}/ws",  # declared host, undeclared port
                f"ws://127.0.0.1:{node_port}/ws",  # the same address, but not the declared host
            ],
            fetch=[f"http://cat.b.test:{catalogue_port}/.well-known/protocolstub/default", "http://elsewhere.test/"],
        )
        record = runtime.registry.stub("b.test")
        assert result["ws"][0] == "opened"
        assert result["ws"][1] == (
            f"EgressError 403: egress: ws://node.b.test:{other.port}/ws not declared by the stub's descriptor "
            f"(it declares ws://node.b.test:{node_port}/ws, http://cat.b.test:{catalogue_port})"
        )
        assert result["ws"][2].startswith(f"EgressError 403: egress: ws://127.0.0.1:{node_port}/ws not declared")
        assert result["fetch"][0].startswith("HTTP 200 ")  # the catalogue's listing, fetched through the broker
        assert result["fetch"][1].startswith("EgressError 403: egress: http://elsewhere.test:80/ not declared")
        assert other.accepted == 0
        assert record.counters["egress_opened"] == 2
        assert record.counters["egress_refused"] == 3
        assert record.isolation["network"] == {"namespace": "own, no interface but loopback", "egress": declared}
        assert not any(item.startswith("network namespace") for item in record.isolation["missing"])


async def test_a_js_stub_reaches_nothing_of_the_host_by_itself(world: JsWorld, tmp_path: Path) -> None:
    catalogue = await world.serve("cat")
    catalogue_port = urlsplit(catalogue).port
    assert catalogue_port is not None
    world.publish_js("cat", "b.test", STUBS / "net_probe.js", {}, egress=[f"http://127.0.0.1:{catalogue_port}"])
    await world.catalogues["cat"].reload()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    unix_path = str(tmp_path / "host-only.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(1)
    try:
        async with world.runtime("y.test", {"b.test": catalogue}) as runtime:
            result = await ask(
                runtime,
                "b.test",
                tcp=[["127.0.0.1", catalogue_port], ["10.0.0.1", 80]],
                udp=[["127.0.0.1", udp.getsockname()[1]], ["10.0.0.1", 53]],
                raw=sys.executable,
                proc=["/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix"],
            )
            assert runtime.registry.stub("b.test").isolation["host"] == "node"
        # Node's own net module, past the broker: the host's loopback is the stub's own, where nothing
        # listens; anything else has no route.
        assert result["tcp"][0].startswith("ECONNREFUSED")
        assert result["tcp"][1].startswith("ENETUNREACH")
        # UDP to the host's loopback lands on the stub's own (nothing arrives here); elsewhere: no route.
        assert result["udp"][0] == "sent"
        with pytest.raises(BlockingIOError):
            udp.recvfrom(100)
        assert result["udp"][1].startswith("ENETUNREACH")
        assert result["raw"] == "PermissionError"  # no CAP_NET_RAW in the JS host's sandbox, for any process
        needle = f":{catalogue_port:04X} "
        assert needle in host_view("/proc/net/tcp")
        assert unix_path in host_view("/proc/net/unix")
        assert needle not in result["proc"]["/proc/net/tcp"]
        assert needle not in result["proc"]["/proc/net/tcp6"]
        assert unix_path not in result["proc"]["/proc/net/unix"]
    finally:
        udp.close()
        unix.close()
