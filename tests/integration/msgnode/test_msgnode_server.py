"""The message node on a real socket, driven by plain ``websockets`` clients (reTHINK conformance cases and more)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import sys

import aiohttp
import pytest
from tests.integration.msgnode.msgnode_helpers import ALLOC, DOMAIN, HYPERTY_ALLOC, OBJECT_ALLOC, SESSION, SM, WAIT
from tests.polling import wait_until
from websockets.asyncio.client import connect

from protofly.msgnode import MessageNode

# -- sessions (the conformance suite's connect sequence, as the open/re-open/close exchange) ---------------


async def test_open_returns_200_and_a_runtime_token(node, client):
    assert node.url == f"ws://127.0.0.1:{node.port}/ws" and node.port > 0
    stub = await client(node)
    reply = await stub.request(id=1, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION)
    assert reply["id"] == 1 and reply["from"] == SESSION and reply["to"] == "hyperty-runtime://a.test/rt"
    assert reply["body"]["code"] == 200 and len(reply["body"]["runtimeToken"]) == 36
    reply = await stub.request(id="s1", type="read", from_="hyperty-runtime://a.test/rt", to="hyperty://b.test/x")
    assert reply["id"] == "s1"  # string ids come back as strings


async def test_reopen_after_a_socket_drop_keeps_the_addresses(node, client, session):
    a = await session(node, "a")
    [address] = await a.allocate()
    await a.ws.close()  # the socket goes away without a 'close' message
    await wait_until(lambda: node.core.session(a.session_url).conn is None)  # the node saw the drop
    again = await client(node)
    reply = await again.request(type="re-open", from_=a.session_url, to=SESSION)
    assert reply["body"]["code"] == 200
    b = await session(node, "b")
    await b.send(id=1, type="update", from_="hyperty-runtime://b.test/rt", to=address, body={"after": "reopen"})
    got = await again.next(lambda m: m.get("to") == address)
    assert got["body"] == {"after": "reopen"}


async def test_reopen_with_an_unknown_token_is_404(node, client):
    stub = await client(node)
    reply = await stub.request(type="re-open", from_="hyperty-runtime://a.test/rt/not-a-token", to=SESSION)
    assert reply["body"]["code"] == 404
    assert "unknown session" in reply["body"]["description"]


async def test_close_frees_the_addresses_and_closes_the_socket(node, session):
    a = await session(node, "a")
    [address] = await a.allocate()
    reply = await a.request(type="close", from_=a.session_url, to=SESSION)
    assert reply["body"]["code"] == 200
    assert await a.closed() == 1000
    b = await session(node, "b")
    reply = await b.request(type="update", from_="hyperty-runtime://b.test/rt", to=address, body={})
    assert reply["body"]["code"] == 404


async def test_a_dropped_session_expires_after_the_grace_period_and_frees_its_addresses(start_node, client, session):
    node = await start_node(session_grace=0.2)
    a = await session(node, "a")
    [address] = await a.allocate()
    await a.ws.close()
    await wait_until(lambda: node.counters["sessions_expired"] == 1, timeout=WAIT)
    assert node.core.owner(address) is None
    b = await session(node, "b")
    reply = await b.request(type="update", from_="hyperty-runtime://b.test/rt", to=address, body={})
    assert reply["body"]["code"] == 404
    late = await client(node)
    reply = await late.request(type="re-open", from_=a.session_url, to=SESSION)
    assert reply["body"]["code"] == 404


async def test_a_dead_peer_is_detected_by_ping(start_node):
    """A peer that never answers pings (a raw socket that stopped reading) is dropped, its session detached."""
    node = await start_node(ping_interval=0.2, session_grace=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101")
        payload = json.dumps({"id": 1, "type": "open", "from": "hyperty-runtime://dead.test/rt", "to": SESSION})
        writer.write(_masked_text_frame(payload.encode()))
        await writer.drain()
        await wait_until(lambda: node.counters["sessions"] == 1)
        # never read again, never pong: the node's heartbeat gives up on us
        await wait_until(lambda: node.counters["open_connections"] == 0, timeout=WAIT)
        assert node.counters["sessions"] == 1  # detached, waiting for a re-open, not gone
    finally:
        writer.close()


def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 65536
    header = (
        struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
        if len(payload) >= 126
        else bytes((0x81, 0x80 | len(payload)))
    )
    return header + mask + masked


async def test_a_restarted_node_on_the_same_port_refuses_the_old_token_and_accepts_open(start_node, client):
    first = await start_node()
    port = first.port
    stub = await client(first)
    await stub.open("hyperty-runtime://a.test/rt")
    await first.stop()
    assert await stub.closed() == 1001
    second = await start_node(port=port)
    assert second.port == port
    again = await client(second)
    reply = await again.request(type="re-open", from_=stub.session_url, to=SESSION)
    assert reply["body"]["code"] == 404
    reply = await again.open("hyperty-runtime://a.test/rt")
    assert reply["body"]["code"] == 200


# -- authentication ------------------------------------------------------------------------------------


async def test_token_authentication_on_open(start_node, client):
    node = await start_node(auth_tokens=["s3cret"])
    stub = await client(node)
    assert (await stub.open("hyperty-runtime://a.test/rt"))["body"]["code"] == 401
    assert (await stub.open("hyperty-runtime://a.test/rt", accessToken="guess"))["body"]["code"] == 403
    reply = await stub.open("hyperty-runtime://a.test/rt", accessToken="s3cret")
    assert reply["body"]["code"] == 200 and reply["body"]["runtimeToken"]


# -- address allocation (conformance: hyperty-allocation, object-allocation) -----------------------------


@pytest.mark.parametrize("to", [HYPERTY_ALLOC, ALLOC])
async def test_single_and_block_hyperty_allocation(node, session, to):
    a = await session(node, "a")
    reply = await a.request(
        id=1, type="create", from_="hyperty-runtime://a.test/rt/registry", to=to, body={"value": {"number": 1}}
    )
    assert reply["from"] == to and reply["to"] == "hyperty-runtime://a.test/rt/registry"
    assert reply["body"]["code"] == 200 and len(reply["body"]["value"]["allocated"]) == 1
    block = await a.allocate(to, value={"number": 5})
    assert len(set(block)) == 5 and all(x.startswith(f"hyperty://{DOMAIN}/") for x in block)
    default = await a.allocate(to, value={})
    assert len(default) == 1


async def test_hyperty_allocation_ignores_the_scheme_object_allocation_honours_it(node, session):
    a = await session(node, "a")
    [hyperty] = await a.allocate(HYPERTY_ALLOC, scheme="comm", value={"number": 1})
    assert hyperty.startswith(f"hyperty://{DOMAIN}/")
    objects = await a.allocate(OBJECT_ALLOC, scheme="comm", value={"number": 2})
    assert len(objects) == 2 and all(x.startswith(f"comm://{DOMAIN}/") for x in objects)


async def test_allocation_key_then_delete_by_key(node, session):
    a = await session(node, "a")
    b = await session(node, "b")
    block = await a.allocate(value={"number": 3, "allocationKey": "my-block"})
    reply = await a.request(
        type="delete", from_="hyperty-runtime://a.test/rt/registry", to=ALLOC, body={"resource": "my-block"}
    )
    assert reply["body"]["code"] == 200
    for address in block:
        reply = await b.request(type="update", from_="hyperty-runtime://b.test/rt", to=address, body={})
        assert reply["body"]["code"] == 404


async def test_delete_by_children_resources(node, session):
    a = await session(node, "a")
    b = await session(node, "b")
    kept, freed = await a.allocate(value={"number": 2})
    reply = await a.request(
        type="delete", from_="hyperty-runtime://a.test/rt/registry", to=ALLOC, body={"childrenResources": [freed]}
    )
    assert reply["body"]["code"] == 200
    reply = await b.request(type="update", from_="hyperty-runtime://b.test/rt", to=freed, body={})
    assert reply["body"]["code"] == 404
    await b.send(id=99, type="update", from_="hyperty-runtime://b.test/rt", to=kept, body={"still": "here"})
    assert (await a.next(lambda m: m.get("to") == kept))["body"] == {"still": "here"}


# -- subscriptions (conformance: subscription) ---------------------------------------------------------


RESOURCE = "comm://a.test/room/changes"


@pytest.mark.parametrize(
    ("key", "source"), [("resources", None), ("subscribe", None), ("resources", "hyperty://s.test/watcher")]
)
async def test_update_reaches_every_subscriber_until_unsubscribed(node, session, key, source):
    publisher = await session(node, "pub")
    subscribers = [await session(node, f"s{i}") for i in range(3)]
    for i, sub in enumerate(subscribers):
        body = {key: [RESOURCE], **({"source": source} if source else {})}
        reply = await sub.request(type="subscribe", from_=f"hyperty-runtime://s{i}.test/rt/sm", to=SM, body=body)
        assert reply["from"] == SM and reply["body"] == {"code": 200}
    await publisher.send(id=1, type="update", from_="comm://a.test/room", to=RESOURCE, body={"value": {"n": 1}})
    for sub in subscribers:
        got = await sub.next(lambda m: m.get("to") == RESOURCE)
        assert got["body"] == {"value": {"n": 1}}
    unsubscribe = {
        "resources" if key == "resources" else "unsubscribe": [RESOURCE],
        **({"source": source} if source else {}),
    }
    reply = await subscribers[0].request(
        type="unsubscribe", from_="hyperty-runtime://s0.test/rt/sm", to=SM, body=unsubscribe
    )
    assert reply["body"]["code"] == 200
    await publisher.send(id=2, type="update", from_="comm://a.test/room", to=RESOURCE, body={"value": {"n": 2}})
    for sub in subscribers[1:]:
        assert (await sub.next(lambda m: m.get("to") == RESOURCE))["body"]["value"] == {"n": 2}
    # ordering on one connection: a marker sent after the update arrives after it, and nothing came before it
    await publisher.send(
        id=3, type="update", from_="hyperty-runtime://pub.test/rt", to=subscribers[0].runtime, body={"marker": True}
    )
    await subscribers[0].next(lambda m: m.get("body") == {"marker": True})
    assert not [m for m in subscribers[0].inbox if m.get("to") == RESOURCE]


async def test_fan_out_to_1000_subscribers_loses_nothing(start_node, session):
    node = await start_node(session_grace=30.0)
    subscribers = await asyncio.gather(*(session(node, f"s{i}") for i in range(1000)))
    for sub, i in zip(subscribers, range(1000), strict=True):
        await sub.send(
            id=1, type="subscribe", from_=f"hyperty-runtime://s{i}.test/rt/sm", to=SM, body={"resources": [RESOURCE]}
        )
    await asyncio.gather(*(sub.next(lambda m: m.get("from") == SM) for sub in subscribers))
    publisher = await session(node, "pub")
    for n in range(5):
        await publisher.send(id=n, type="update", from_="comm://a.test/room", to=RESOURCE, body={"n": n})
    for sub in subscribers:
        got = [await sub.next(lambda m: m.get("to") == RESOURCE, timeout=10) for _ in range(5)]
        assert [m["body"]["n"] for m in got] == [0, 1, 2, 3, 4]
    assert node.counters["fanout_deliveries"] == 5000
    assert node.counters["buffered"] == 0 and node.counters["slow_consumers"] == 0


# -- routing ---------------------------------------------------------------------------------------------


async def test_ping_and_pong_between_two_allocated_hyperties(node, session):
    a = await session(node, "a")
    b = await session(node, "b")
    [ha] = await a.allocate()
    [hb] = await b.allocate()
    await a.send(id=1, type="execute", from_=ha, to=hb, body={"method": "ping"})
    ping = await b.next(lambda m: m.get("to") == hb)
    assert ping["from"] == ha and ping["body"] == {"method": "ping"}
    await b.send(id=ping["id"], type="response", from_=hb, to=ha, body={"code": 200, "value": "pong"})
    pong = await a.next(lambda m: m.get("to") == ha)
    assert pong["id"] == 1 and pong["body"]["value"] == "pong"


async def test_a_foreign_hyperty_is_bound_on_the_fly_so_its_reply_routes_back(node, session):
    foreign = await session(node, "a")  # runtime of a.test connected to b.test's node
    local = await session(node, "b")
    [hb] = await local.allocate()
    await foreign.send(id=1, type="execute", from_="hyperty://a.test/x", to=hb, body={"method": "ping"})
    ping = await local.next(lambda m: m.get("to") == hb)
    await local.send(id=ping["id"], type="response", from_=hb, to="hyperty://a.test/x", body={"code": 200})
    reply = await foreign.next(lambda m: m.get("to") == "hyperty://a.test/x")
    assert reply["type"] == "response" and reply["id"] == 1


async def test_messages_to_a_runtime_url_and_below_reach_its_session(node, session):
    a = await session(node, "a")
    b = await session(node, "b")
    await b.send(id=1, type="update", from_="hyperty-runtime://b.test/rt", to="hyperty-runtime://a.test/rt/sm", body={})
    assert (await a.next(lambda m: m.get("to") == "hyperty-runtime://a.test/rt/sm"))["id"] == 1


async def test_unknown_destination_is_404_and_registry_is_501(node, session):
    a = await session(node, "a")
    reply = await a.request(type="read", from_="hyperty-runtime://a.test/rt", to="hyperty://b.test/ghost")
    assert reply["body"]["code"] == 404 and "hyperty://b.test/ghost" in reply["body"]["description"]
    reply = await a.request(type="read", from_="hyperty-runtime://a.test/rt/registry", to=f"domain://registry.{DOMAIN}")
    assert reply["body"]["code"] == 501


# -- bad input -------------------------------------------------------------------------------------------


async def test_missing_fields_are_400_naming_the_field(node, session):
    a = await session(node, "a")
    await a.ws.send(json.dumps({"id": 5, "type": "update", "from": "hyperty-runtime://a.test/rt"}))
    reply = await a.next(lambda m: m.get("id") == 5)
    assert reply["body"]["code"] == 400 and reply["body"]["description"].startswith("to")
    await a.ws.send(
        json.dumps(
            {
                "id": 6,
                "type": "create",
                "from": "hyperty-runtime://a.test/rt",
                "to": ALLOC,
                "body": {"value": {"number": "two"}},
            }
        )
    )
    reply = await a.next(lambda m: m.get("id") == 6)
    assert reply["body"]["code"] == 400 and "number" in reply["body"]["description"]


async def test_invalid_json_closes_1007(node, session):
    a = await session(node, "a")
    await a.ws.send("{this is not json")
    assert await a.closed() == 1007
    assert "json" in a.ws.close_reason


async def test_an_oversized_frame_closes_1009(start_node, client):
    node = await start_node(max_frame=4096)
    stub = await client(node)
    await stub.open("hyperty-runtime://a.test/rt")
    await stub.ws.send(json.dumps({"id": 1, "type": "update", "from": "x:y", "to": "x:z", "body": {"b": "x" * 5000}}))
    assert await stub.closed() == 1009


async def test_a_binary_frame_closes_1003(node, session):
    a = await session(node, "a")
    await a.ws.send(b'{"id":1}')
    assert await a.closed() == 1003


async def test_a_slow_consumer_is_disconnected_and_memory_stays_bounded(start_node, session, client):
    limit = 256 << 10
    node = await start_node(send_queue=10_000, send_queue_bytes=limit)
    # the slow runtime stops reading: the client library pauses its socket after 4 frames, the kernel
    # buffers fill, then the node's queue for it grows to the limit
    slow = await client(node, max_queue=4)
    await slow.open("hyperty-runtime://slow.test/rt")
    [target] = await slow.allocate()
    slow._reader.cancel()  # stop reading for good
    sender = await session(node, "fast")
    body = {"blob": "x" * 32_000}
    for n in range(2_000):  # up to 64 MB offered; the node gives up on the reader long before
        await sender.send(id=n, type="update", from_="hyperty-runtime://fast.test/rt", to=target, body=body)
        if node.counters["slow_consumers"]:
            break
        if n % 50 == 0:
            await asyncio.sleep(0)  # let the node run
    await wait_until(lambda: node.counters["slow_consumers"] == 1, timeout=WAIT)
    counters = node.counters
    assert counters["queue_peak_bytes"] <= limit
    assert counters["transport_peak_bytes"] <= 512 << 10
    await wait_until(lambda: node.counters["open_connections"] == 1, timeout=WAIT)  # only the sender is left
    # the target's session is detached now: what is sent to it waits for its re-open, within bounds
    await sender.send(id="late", type="update", from_="hyperty-runtime://fast.test/rt", to=target, body={})
    await wait_until(lambda: node.counters["buffered"] >= 1, timeout=WAIT)
    assert node.core.owner(target).conn is None


# -- batching extension ----------------------------------------------------------------------------------


async def test_batching_is_negotiated_and_plain_clients_keep_one_message_per_frame(node, client, session):
    plain = await session(node, "plain")
    [hp] = await plain.allocate()
    batched = await client(node)
    reply = await batched.open("hyperty-runtime://batch.test/rt", batch=True)
    assert reply["body"]["batch"] is True and reply["body"]["maxFrame"] == node.max_frame
    assert batched.arrays == 0  # the grant itself is a plain frame
    [hb] = await batched.allocate()
    # a batch client may send arrays
    burst = [{"id": n, "type": "update", "from": hb, "to": hp, "body": {"n": n}} for n in range(50)]
    await batched.ws.send(json.dumps(burst))
    got = [await plain.next(lambda m: m.get("to") == hp) for _ in range(50)]
    assert [m["body"]["n"] for m in got] == list(range(50))
    assert plain.arrays == 0 and plain.frames >= 50 + 2
    # and may receive several messages per frame
    frames_before = batched.frames
    for n in range(200):
        await plain.send(id=n, type="update", from_=hp, to=hb, body={"n": n})
    got = [await batched.next(lambda m: m.get("to") == hb) for _ in range(200)]
    assert [m["body"]["n"] for m in got] == list(range(200))
    assert batched.frames - frames_before <= 200
    assert node.counters["messages_out"] >= node.counters["frames_out"]


async def test_arrays_from_a_client_that_did_not_ask_for_batching_close_1007(node, session):
    a = await session(node, "a")
    await a.ws.send(json.dumps([{"id": 1, "type": "update", "from": "x:y", "to": "x:z"}]))
    assert await a.closed() == 1007


# -- operations ------------------------------------------------------------------------------------------


async def test_stats_endpoint_reports_the_counters(node, session):
    await session(node, "a")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{node.port}/stats", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
            stats = await r.json()
    assert stats["domain"] == DOMAIN and stats["sessions"] == 1 and stats["sessions_opened"] == 1


async def test_node_as_context_manager_releases_its_port():
    async with MessageNode(DOMAIN) as node:
        port = node.port
        assert node.running
    assert not node.running
    async with MessageNode(DOMAIN, port=port) as again:
        assert again.port == port


async def test_cli_serve_prints_the_url_and_serves(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted\nt0ken\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "protofly.cli",
        "msg-node",
        "serve",
        "--domain",
        DOMAIN,
        "--port",
        "0",
        "--auth-tokens-file",
        str(tokens),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        url = line.decode().strip()
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/ws")
        async with connect(url, open_timeout=WAIT) as ws:
            await ws.send(
                json.dumps(
                    {
                        "id": 1,
                        "type": "open",
                        "from": "hyperty-runtime://a.test/rt",
                        "to": SESSION,
                        "body": {"accessToken": "t0ken"},
                    }
                )
            )
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert reply["body"]["code"] == 200
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=10)
    assert code == 0


async def test_cli_serve_refuses_a_negative_ack_delay_naming_the_option():
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "protofly.cli",
        "msg-node",
        "serve",
        "--domain",
        DOMAIN,
        "--port",
        "0",
        "--ack-delay",
        "-1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 2 and out == b""  # never listened
    assert b"--ack-delay" in err


async def test_plain_http_on_the_websocket_path_is_a_clear_400(node):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{node.port}/ws", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
            assert r.status == 400
            assert "WebSocket" in (await r.json())["description"]
