"""The message node's /metrics, /healthz and /readyz beside /ws, scraped while real clients use it."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.msgnode.msgnode_helpers import SM
from tests.polling import wait_until

from protofly.msgnode.metrics import GAUGES


async def scrape(node) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{node.port}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels == {"domain": node.domain}
            samples[sample.name] = sample.value
    return samples


async def test_node_metrics_follow_sessions_addresses_subscriptions_and_buffers(node, session):
    empty = await scrape(node)
    assert {name for name, _, _ in GAUGES} <= set(empty)
    assert empty["protofly_msgnode_sessions"] == 0
    a = await session(node, "a")
    b = await session(node, "b")
    [address] = await a.allocate()
    body = {"resources": ["comm://a.test/room/changes"]}
    reply = await b.request(type="subscribe", from_="hyperty-runtime://b.test/rt/sm", to=SM, body=body)
    assert reply["body"]["code"] == 200
    used = await scrape(node)
    assert used["protofly_msgnode_sessions"] == 2
    assert used["protofly_msgnode_open_connections"] == 2
    assert used["protofly_msgnode_addresses"] == 1
    assert used["protofly_msgnode_subscriptions"] == 1
    assert used["protofly_msgnode_messages_in_total"] >= 4
    await a.ws.close()  # a's session is detached: messages for it are buffered
    await wait_until(lambda: node.core.session(a.session_url).conn is None)
    await b.send(id=7, type="update", from_="hyperty-runtime://b.test/rt", to=address, body={"n": 1})
    await wait_until(lambda: node.counters["buffered"] == 1)
    detached = await scrape(node)
    assert detached["protofly_msgnode_sessions_detached"] == 1
    assert detached["protofly_msgnode_buffered_messages"] == 1
    assert detached["protofly_msgnode_buffered_bytes"] > 0
    assert detached["protofly_msgnode_buffered_total"] == 1
    assert detached["protofly_msgnode_slow_consumers_total"] == 0


async def test_node_health_and_readiness(node):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{node.port}/healthz") as answer:
            assert answer.status == 200
            assert (await answer.json())["domain"] == node.domain
        async with http.get(f"http://127.0.0.1:{node.port}/readyz") as answer:
            assert answer.status == 200
            assert (await answer.json())["ready"] is True
