"""A real message node on 127.0.0.1 and plain ``websockets`` clients that speak to it like a reTHINK stub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from tests.integration.msgnode.msgnode_helpers import DOMAIN, WAIT, Client
from websockets.asyncio.client import connect

from protofly.msgnode import MessageNode


@pytest.fixture
async def start_node() -> AsyncIterator[Callable[..., Any]]:
    """Start ``MessageNode(DOMAIN, **options)`` on 127.0.0.1; every node is stopped at teardown."""
    nodes: list[MessageNode] = []

    async def start(**options: Any) -> MessageNode:
        node = MessageNode(DOMAIN, "127.0.0.1", **options)
        await node.start()
        nodes.append(node)
        return node

    yield start
    for node in reversed(nodes):
        await node.stop()


@pytest.fixture
async def node(start_node) -> MessageNode:
    return await start_node(session_grace=30.0)


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., Any]]:
    """``await client(node_or_url, **connect_options)`` -> a connected :class:`Client`, closed at teardown."""
    clients: list[Client] = []

    async def make(target: MessageNode | str, *, auto_drain: bool = False, **options: Any) -> Client:
        url = target if isinstance(target, str) else target.url
        ws = await asyncio.wait_for(connect(url, open_timeout=WAIT, **options), timeout=WAIT)
        made = Client(ws, auto_drain=auto_drain)
        clients.append(made)
        return made

    yield make
    await asyncio.gather(*(c.aclose() for c in clients))


@pytest.fixture
async def session(client) -> Callable[..., Any]:
    """``await session(node, name)`` -> a client with an open session for ``hyperty-runtime://<name>.test/rt``."""

    async def make(node: MessageNode, name: str, **body: Any) -> Client:
        made = await client(node)
        reply = await made.open(f"hyperty-runtime://{name}.test/rt", **body)
        assert reply["body"]["code"] == 200, reply
        return made

    return make
