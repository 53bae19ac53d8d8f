"""What the cluster's shared tables hold beyond allocations: orphaned sessions expire, foreign bindings are shared.

Real node processes on a real three-server NATS cluster (``conftest.py``); clients are stub-like
``websockets`` clients; the orphan is made by a real SIGKILL of its node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats as nats_client
import pytest
from nats.js.errors import NotFoundError
from tests.integration.cluster.conftest import DOMAIN, serve_node
from tests.integration.cluster.test_cluster import _client, _eventually, _runtime
from tests.integration.msgnode.msgnode_helpers import ALLOC, SESSION

from protofly.msgnode.cluster.names import Names, session_id
from protofly.msgnode.cluster.natsrun import NatsCluster
from protofly.msgnode.process import NodeProcess


@pytest.fixture
async def short_grace_nodes(nats: NatsCluster) -> AsyncIterator[list[NodeProcess]]:
    """Three nodes whose sessions outlive their socket (or their node) by one second only."""
    started = await asyncio.gather(*(serve_node(f"n{i}", nats.url, "--session-grace", "1") for i in (1, 2, 3)))
    yield list(started)
    await asyncio.gather(*(node.stop() for node in started))


async def _expired(nodes: list[NodeProcess]) -> int:
    return sum([(await node.stats())["cluster_orphans_expired"] for node in nodes])


async def test_a_session_orphaned_by_its_nodes_death_is_expired_by_exactly_one_survivor(
    nats: NatsCluster, short_grace_nodes: list[NodeProcess]
) -> None:
    first, second, third = short_grace_nodes
    orphan = await _client(second.url)
    alice, a = await _runtime(first.url, "alice")
    try:
        assert (await orphan.open("hyperty-runtime://orphan.test/rt"))["body"]["code"] == 200
        reply = await orphan.request(
            type="create",
            from_=f"{orphan.runtime}/registry",
            to=ALLOC,
            body={"value": {"number": 1, "allocationKey": "the-room"}},
        )
        assert reply["body"]["code"] == 200, reply
        [address] = reply["body"]["value"]["allocated"]
        second.kill()
        await second.proc.wait()
        # while it waits for a re-open, a message for it is kept in its buffer stream
        await alice.send(id=1, type="update", from_=a, to=address, body={"n": 1})

        async def one_expired() -> bool:
            return await _expired([first, third]) >= 1

        await _eventually(one_expired, timeout=15)
        await asyncio.sleep(1.0)  # two more sweeps of both survivors: nobody expires it a second time
        assert await _expired([first, third]) == 1
        # its address routes nowhere, its allocation key is free, its session cannot be re-opened
        answer = await alice.request(type="execute", from_=a, to=address, body={"n": 2})
        assert answer["body"]["code"] == 404, answer
        late = await _client(third.url)
        assert (await late.reopen(orphan.session_url))["body"]["code"] == 404
        assert (await late.open("hyperty-runtime://late.test/rt"))["body"]["code"] == 200
        body = {"value": {"number": 1, "allocationKey": "the-room"}}
        again = await late.request(type="create", from_=f"{late.runtime}/registry", to=ALLOC, body=body)
        assert again["body"]["code"] == 200, again
        await late.aclose()
        # and its buffer is gone from the stream
        names = Names(DOMAIN)
        nc = await nats_client.connect(nats.urls, connect_timeout=2, allow_reconnect=False)
        try:
            with pytest.raises(NotFoundError):
                await nc.jetstream(timeout=5).get_msg(
                    names.buffers, seq=1, subject=names.buffer(session_id(orphan.session_url)), next=True
                )
        finally:
            await nc.close()
    finally:
        await asyncio.gather(orphan.aclose(), alice.aclose())


async def test_a_reply_to_a_foreign_hyperty_bound_on_node_1_routes_from_node_3(nodes: list[NodeProcess]) -> None:
    """A session speaks for ``hyperty://a.test/carol`` (another domain's hyperty) through node 1.

    The binding is the cluster's, like an allocation: bob on node 3 replies to carol at once and the reply
    comes back through alice's session on node 1; once alice's session ends, the binding goes with it.
    """
    alice, _ = await _runtime(nodes[0].url, "alice")
    bob, b = await _runtime(nodes[2].url, "bob")
    carol = "hyperty://a.test/carol"
    try:
        for n in range(5):
            await alice.send(id=n, type="execute", from_=carol, to=b, body={"n": n})
            request = await bob.next(lambda m: m.get("to") == b and m.get("type") == "execute")
            assert request["from"] == carol
            await bob.send(id=n, type="response", from_=b, to=carol, body={"code": 200, "value": n})
            reply: dict[str, Any] = await alice.next(lambda m: m.get("to") == carol)
            assert reply["type"] == "response" and reply["body"]["value"] == n
        assert (await nodes[2].stats())["forwarded"] >= 5
        closed = await alice.request(type="close", from_=alice.session_url, to=SESSION)
        assert closed["body"]["code"] == 200

        async def unbound() -> bool:
            answer = await bob.request(type="execute", from_=b, to=carol, body={})
            return bool(answer["body"]["code"] == 404)

        await _eventually(unbound)
    finally:
        await asyncio.gather(alice.aclose(), bob.aclose())
