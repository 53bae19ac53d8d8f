"""The message node stub's asyncio shell against a fake node written here (real sockets on 127.0.0.1).

The fake node speaks just enough of the protocol to script what a test needs: sessions that survive or
are forgotten, silence, a required token, a graceful drain.  The stub runs in this process on the real
SDK bus; what it posts to the runtime is collected and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from protofly.message import Message, response_code
from protofly.stub import Bus

RUNTIME = "hyperty-runtime://a.test/rt1"
STUB = RUNTIME + "/protostub/1"
SECRET = "tok-9f8e7d6c-never-logged"


class FakeNode:
    """A scripted message node: records every frame per connection, answers the session protocol."""

    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.frames: list[list[dict[str, Any]]] = []  # per connection, every message received
        self.conns: list[ServerConnection] = []
        self.silent = False
        self.required_token: str | None = None
        self.changed = asyncio.Event()
        self.port = 0
        self.ended = 0  # connections whose every received frame is in ``frames``
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, port: int = 0) -> None:
        self._server = await serve(self._handle, "127.0.0.1", port, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def data(self) -> list[dict[str, Any]]:
        """Every non-session message received, over all connections, in order."""
        return [m for conn in self.frames for m in conn if m["to"] != "mn:/session"]

    async def wait(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def send(self, msg: dict[str, Any], conn: int = -1) -> None:
        await self.conns[conn].send(json.dumps(msg))

    async def _handle(self, ws: ServerConnection) -> None:
        received: list[dict[str, Any]] = []
        self.frames.append(received)
        self.conns.append(ws)
        self.changed.set()
        with contextlib.suppress(ConnectionClosed):
            async for text in ws:
                data = json.loads(text)
                for msg in data if isinstance(data, list) else [data]:
                    received.append(msg)
                    self.changed.set()
                    if msg["to"] == "mn:/session" and not self.silent:
                        await self._session(ws, msg)
        self.ended += 1
        self.changed.set()

    async def _session(self, ws: ServerConnection, msg: dict[str, Any]) -> None:
        body = msg.get("body") or {}
        reply: dict[str, Any] = {"id": msg.get("id"), "type": "response", "from": "mn:/session", "to": msg["from"]}
        if msg["type"] == "open":
            if self.required_token is not None and body.get("accessToken") != self.required_token:
                reply["body"] = {"code": 401, "description": "open: this node requires body.accessToken"}
            else:
                token = str(uuid.uuid4())
                self.sessions.add(f"{msg['from']}/{token}")
                reply["body"] = {"code": 200, "runtimeToken": token, "batch": True, "maxFrame": 1 << 20, "drain": True}
        elif msg["type"] == "re-open":
            if msg["from"] in self.sessions:
                reply["body"] = {"code": 200, "runtimeToken": msg["from"].rsplit("/", 1)[1], "batch": True}
            else:
                reply["body"] = {"code": 404, "description": "unknown session"}
        elif msg["type"] == "close":
            self.sessions.discard(msg["from"])
            await ws.send(json.dumps({**reply, "body": {"code": 200}}))
            await ws.close(1000, "session closed")
            return
        else:
            return
        await ws.send(json.dumps(reply))


class Runtime:
    """What the stub posts on its bus: statuses and deliveries, awaitable by count."""

    def __init__(self) -> None:
        self.posted: list[Message] = []
        self.changed = asyncio.Event()
        self.bus = Bus(self._take)

    def _take(self, msg: Message) -> None:
        self.posted.append(msg)
        self.changed.set()

    def statuses(self) -> list[tuple[str, str | None]]:
        return [(m.body["value"], m.body.get("description")) for m in self.posted if m.to == STUB + "/status"]

    def values(self) -> list[str]:
        return [value for value, _ in self.statuses()]

    def deliveries(self) -> list[Message]:
        return [m for m in self.posted if m.to not in (STUB + "/status", STUB + "/state")]

    def saved(self) -> list[dict[str, Any]]:
        """What the stub saved for its next instance (``ProtoStub.save_state``), oldest first."""
        return [m.body or {} for m in self.posted if m.to == STUB + "/state"]

    async def wait(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def request(n: int) -> Message:
    return Message(id=n, type="create", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={"n": n})


@pytest.fixture
async def node():
    fake = FakeNode()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_stub(mn):
    made: list[Runtime] = []

    def make(url: str, **config):
        runtime = Runtime()
        settings = {
            "url": url,
            "runtimeURL": RUNTIME,
            "backoffBase": 0.01,
            "backoffCap": 0.05,
            "openTimeout": 1.0,
            **config,
        }
        stub = mn.MsgNodeStub(STUB, runtime.bus, settings)
        made.append(runtime)
        return stub, runtime

    yield make
    for runtime in made:  # every task a stub started is owned by its bus: cancel them, as the host does
        await runtime.bus.close()


async def test_connect_carries_messages_both_ways_with_via(node, make_stub) -> None:
    stub, runtime = make_stub(node.url)
    await stub.handle_execute("connect", [None])
    assert runtime.values() == ["created", "in-progress", "live"]
    for n in range(3):
        runtime.bus.dispatch(request(n))
    await node.wait(lambda: len(node.data()) == 3)
    assert [m["body"]["n"] for m in node.data()] == [0, 1, 2]
    assert all(m["body"]["via"] == STUB for m in node.data())
    await node.send(
        {
            "id": 5,
            "type": "create",
            "from": "hyperty://b.test/y",
            "to": "hyperty://a.test/x",
            "body": {"hello": 1, "via": "somewhere-else"},
        }
    )
    await node.send({"type": "update", "from": "mn:/session", "to": RUNTIME, "body": {"value": "noise"}})
    await runtime.wait(lambda: len(runtime.deliveries()) == 1)
    delivered = runtime.deliveries()[0]
    assert delivered.body == {"hello": 1, "via": STUB} and delivered.from_ == "hyperty://b.test/y"


async def test_lost_socket_reconnects_and_sends_everything_accepted_meanwhile(node, make_stub) -> None:
    stub, runtime = make_stub(node.url)
    await stub.handle_execute("connect", [None])
    runtime.bus.dispatch(request(0))
    await node.wait(lambda: len(node.data()) == 1)
    node.silent = True  # the next connection gets no answer for a while: messages must wait
    node.conns[-1].transport.abort()
    await runtime.wait(lambda: runtime.values()[-1] == "disconnected")
    for n in range(1, 50):
        runtime.bus.dispatch(request(n))
    await node.wait(lambda: len(node.frames) >= 2)
    assert len(node.data()) == 1
    node.silent = False
    await runtime.wait(lambda: runtime.values()[-1] == "live", timeout=10)
    await node.wait(lambda: len(node.data()) == 50)
    assert [m["body"]["n"] for m in node.data()] == list(range(50))
    assert ("disconnected", "1006 (abnormal closure, no close frame)") in runtime.statuses()
    assert runtime.values()[:4] == ["created", "in-progress", "live", "disconnected"]
    assert runtime.values()[-1] == "live"
    reopens = [m for conn in node.frames for m in conn if m["type"] == "re-open"]
    assert reopens and reopens[-1]["from"].startswith(RUNTIME + "/")
    assert stub.session.counters["reopen_fallbacks"] == 0


async def test_node_restart_without_state_falls_back_to_open(node, make_stub) -> None:
    stub, runtime = make_stub(node.url)
    await stub.handle_execute("connect", [None])
    first = stub.session.session_url
    port = node.port
    await node.stop()
    await runtime.wait(lambda: runtime.values()[-1] == "disconnected")
    runtime.bus.dispatch(request(1))
    fresh = FakeNode()
    await fresh.start(port)
    try:
        await runtime.wait(lambda: runtime.values()[-1] == "live", timeout=10)
        await fresh.wait(lambda: len(fresh.data()) == 1)
        assert stub.session.session_url != first
        assert stub.session.counters["reopen_fallbacks"] == 1
        assert "did not know" in runtime.statuses()[-1][1]
        kinds = [m["type"] for m in fresh.frames[-1] if m["to"] == "mn:/session"]
        assert kinds == ["re-open", "open"]
    finally:
        await fresh.stop()


async def test_first_connect_to_nothing_fails_with_the_reason(make_stub) -> None:
    probe = FakeNode()
    await probe.start()
    url = probe.url
    await probe.stop()  # a port that was just free: nothing listens there now
    stub, runtime = make_stub(url)
    with pytest.raises(ConnectionError, match="cannot reach the message node"):
        await stub.handle_execute("connect", [None])
    assert runtime.values() == ["created", "in-progress", "failed"]
    assert "ConnectionRefusedError" in runtime.statuses()[-1][1] or "Connect call failed" in runtime.statuses()[-1][1]


async def test_first_open_without_answer_times_out(node, make_stub) -> None:
    node.silent = True
    stub, runtime = make_stub(node.url, openTimeout=0.2)
    with pytest.raises(ConnectionError, match="Timeout from mn:/session"):
        await stub.handle_execute("connect", [None])
    assert runtime.values()[-1] == "failed"


async def test_drain_sends_drained_last_and_nothing_is_lost(node, make_stub) -> None:
    stub, runtime = make_stub(node.url)
    await stub.handle_execute("connect", [None])
    session_url = stub.session.session_url
    runtime.bus.dispatch(request(0))
    await node.wait(lambda: len(node.data()) == 1)
    await node.send({"type": "update", "from": "mn:/session", "to": session_url, "body": {"value": "draining"}})
    await node.wait(lambda: any(m["body"].get("value") == "drained" for m in node.frames[0] if m.get("body")))
    for n in range(1, 20):
        runtime.bus.dispatch(request(n))
    # A marker from the node, delivered after those requests were accepted: the stub has had its turn to
    # write them.  Then the node closes, and once its side of the connection has ended, every frame the stub
    # sent on it is in frames[0]: 'drained' must still be the last.
    await node.send(
        {"id": 99, "type": "create", "from": "hyperty://b.test/y", "to": "hyperty://a.test/x", "body": {"marker": True}}
    )
    await runtime.wait(lambda: any(m.id == 99 for m in runtime.deliveries()))
    await node.conns[0].close(1001, "message node restarting")
    await node.wait(lambda: node.ended >= 1)
    assert node.frames[0][-1]["body"] == {"value": "drained"} and node.frames[0][-1]["from"] == session_url
    await runtime.wait(lambda: runtime.values().count("live") == 2, timeout=10)
    await node.wait(lambda: len(node.data()) == 20)
    assert [m["body"]["n"] for m in node.data()] == list(range(20))
    assert [m["body"]["n"] for m in node.frames[0] if m["to"] != "mn:/session"] == [0]
    assert any("drained the session" in (d or "") for v, d in runtime.statuses() if v == "disconnected")
    assert stub.session.counters["drains"] == 1


async def test_disconnect_closes_the_session_and_later_messages_are_answered(node, make_stub) -> None:
    stub, runtime = make_stub(node.url)
    await stub.handle_execute("connect", [None])
    runtime.bus.dispatch(request(1))
    await stub.handle_execute("disconnect", [])
    assert runtime.statuses()[-1] == ("disconnected", "1000 (normal closure): session closed")
    assert [m["type"] for m in node.frames[0]] == ["open", "create", "close"]
    runtime.bus.dispatch(request(2))
    await runtime.wait(lambda: len(runtime.deliveries()) == 1)
    refused = runtime.deliveries()[0]
    assert response_code(refused) == 503 and refused.to == "hyperty://a.test/x" and refused.id == 2
    await stub.handle_execute("connect", [None])
    assert runtime.values()[-1] == "live"
    assert [m["type"] for m in node.frames[1]] == ["open"]  # a new session, not a re-open of the closed one


async def test_token_goes_to_open_only_and_never_to_a_log(node, make_stub, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    node.required_token = SECRET
    stub, runtime = make_stub(node.url)
    with pytest.raises(ConnectionError, match="401"):
        await stub.handle_execute("connect", [None])
    assert runtime.values()[-1] == "failed"
    await stub.handle_execute("connect", [{"accessToken": SECRET}])
    assert runtime.values()[-1] == "live"
    opens = [m for conn in node.frames for m in conn if m["type"] == "open"]
    assert opens[-1]["body"]["accessToken"] == SECRET
    node.conns[-1].transport.abort()
    await runtime.wait(lambda: runtime.values().count("live") == 2)
    assert all(SECRET not in json.dumps(m) for m in node.frames[-1])  # re-open carries no token
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert all(SECRET not in json.dumps(m.body) for m in runtime.posted)
