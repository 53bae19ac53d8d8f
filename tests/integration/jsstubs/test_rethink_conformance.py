"""reTHINK's message-node conformance sequence, run with reTHINK's own Vert.x stub against protofly's node.

As in reTHINK's specs (``tests/msg-node``: connect, hyperty allocation, ping, subscription), with the
runtime played by the test: two unmodified ``default.ps.js`` stubs, each in its own Node sandbox host
(process sandbox, bwrap where it works), each for its own runtime URL, both on one ``protofly msg-node``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from protofly.message import Message, response_code
from protofly.msgnode import MessageNode
from protofly.sandbox import Boundary
from protofly.sandbox.broker import EgressPolicy
from protofly.sandbox.egress import parse_endpoint
from protofly.sandbox.process import ProcessSandbox
from protofly.sandbox.process_component import ProcessComponent

from .conftest import DATA

DOMAIN = "x.test"
ALLOCATION = f"domain://msg-node.{DOMAIN}/hyperty-address-allocation"
SM = f"domain://msg-node.{DOMAIN}/sm"
WAIT = 10.0


class Side:
    """One runtime of the sequence: its stub (a Node host) and everything the stub sent to it."""

    def __init__(self, runtime_url: str) -> None:
        self.runtime_url = runtime_url
        self.url = f"{runtime_url}/protostub/1"
        self.inbox: list[Message] = []
        self.arrived = asyncio.Event()
        self.component: ProcessComponent | None = None

    def on_message(self, msg: Message) -> None:
        self.inbox.append(msg)
        self.arrived.set()

    def statuses(self) -> list[str]:
        return [m.body["value"] for m in self.inbox if m.to == f"{self.url}/status" and m.body]

    async def next(self, match: Callable[[Message], bool]) -> Message:
        async with asyncio.timeout(WAIT):
            while True:
                for msg in self.inbox:
                    if match(msg):
                        return msg
                self.arrived.clear()
                await self.arrived.wait()

    def post(self, **fields: Any) -> None:
        assert self.component is not None and self.component.post(Message(**fields))

    async def allocate(self) -> tuple[str, Message]:
        self.post(
            id=1, type="create", from_=f"{self.runtime_url}/registry", to=ALLOCATION, body={"value": {"number": 1}}
        )
        answer = await self.next(lambda m: m.type == "response" and m.to == f"{self.runtime_url}/registry")
        assert response_code(answer) == 200, answer.body
        [hyperty] = answer.body["value"]["allocated"]
        return hyperty, answer


@pytest.fixture
async def sides() -> AsyncIterator[tuple[Side, Side]]:
    node = MessageNode(DOMAIN, port=0)
    await node.start()
    source = (DATA / "default.ps.js").read_bytes()
    pair = (Side("runtime://one.test/rt1"), Side("runtime://two.test/rt2"))
    async with ProcessSandbox(prestart=0) as sandbox:
        for side in pair:
            boundary = Boundary(
                runtime_url=side.runtime_url,
                runtime_domain=side.runtime_url.split("/")[2],
                stub_domain=DOMAIN,
            )
            side.component = await sandbox.deploy(
                url=side.url,
                source=source,
                config={"url": node.url, "runtimeURL": side.runtime_url},  # no maxBuffer: the host's default
                classname=None,
                limits=None,
                boundary=boundary,
                on_message=side.on_message,
                on_exit=lambda reason: None,
                language="Javascript ECMA6",
                egress=EgressPolicy((parse_endpoint(node.url),)),  # the node, opened by the broker
            )
            answer = await side.component.execute("connect", [{}], timeout=WAIT)
            assert response_code(answer) == 200
        yield pair
    await node.stop()


def session_of(side: Side) -> Callable[[str], bool]:
    """The stub's session URL on the node: its runtime URL plus the node's runtimeToken."""
    return lambda via: via.startswith(side.runtime_url + "/") and len(via) > len(side.runtime_url) + 1


async def test_connect_allocate_carry_subscribe_disconnect(sides: tuple[Side, Side]) -> None:
    one, two = sides
    for side in sides:  # status: created -> in-progress -> live, nothing else
        await side.next(lambda m, s=side: m.to == f"{s.url}/status" and m.body["value"] == "live")
        assert side.statuses() == ["created", "in-progress", "live"]
        assert side.component is not None and side.component.isolation["host"] == "node"

    hyperty_one, answer = await one.allocate()  # one hyperty address, the answer delivered with via
    hyperty_two, _ = await two.allocate()
    assert hyperty_one.startswith(f"hyperty://{DOMAIN}/") and hyperty_two != hyperty_one
    assert session_of(one)(answer.body["via"])

    one.post(id=2, type="update", from_=hyperty_one, to=hyperty_two, body={"value": {"n": 1}})
    carried = await two.next(lambda m: m.to == hyperty_two)
    assert carried.from_ == hyperty_one and carried.body["value"] == {"n": 1}
    assert session_of(two)(carried.body["via"])  # via: the receiving stub

    resource = f"comm://{DOMAIN}/room/changes"
    two.post(id=3, type="subscribe", from_=f"{two.runtime_url}/sm", to=SM, body={"resources": [resource]})
    subscribed = await two.next(lambda m: m.type == "response" and m.id == 3)
    assert response_code(subscribed) == 200
    one.post(id=4, type="update", from_=f"comm://{DOMAIN}/room", to=resource, body={"value": {"n": 2}})
    published = await two.next(lambda m: m.to == resource)
    assert published.body["value"] == {"n": 2} and session_of(two)(published.body["via"])

    assert one.component is not None
    answer = await one.component.execute("disconnect", [], timeout=WAIT)
    assert response_code(answer) == 200
    assert one.statuses()[-1] == "disconnected"  # reported before disconnect() was answered


async def test_a_ping_between_hyperties_behind_two_stubs_arrives_with_via_the_receiving_stub(
    sides: tuple[Side, Side],
) -> None:
    one, two = sides
    hyperty_one, _ = await one.allocate()
    hyperty_two, _ = await two.allocate()
    one.post(id=5, type="ping", from_=hyperty_one, to=hyperty_two, body={})
    ping = await two.next(lambda m: m.type == "ping")
    assert ping.from_ == hyperty_one and ping.to == hyperty_two
    assert session_of(two)(ping.body["via"])


async def test_without_bwrap_the_namespace_is_reported_missing_and_the_websocket_is_still_brokered() -> None:
    node = MessageNode(DOMAIN, port=0)
    await node.start()
    side = Side("runtime://one.test/rt1")
    try:
        async with ProcessSandbox(use_bwrap=False, prestart=0) as sandbox:
            side.component = await sandbox.deploy(
                url=side.url,
                source=(DATA / "default.ps.js").read_bytes(),
                config={"url": node.url, "runtimeURL": side.runtime_url},
                classname=None,
                limits=None,
                boundary=Boundary(runtime_url=side.runtime_url, runtime_domain="one.test", stub_domain=DOMAIN),
                on_message=side.on_message,
                on_exit=lambda reason: None,
                language="Javascript ECMA6",
                egress=EgressPolicy((parse_endpoint(node.url),)),
            )
            answer = await side.component.execute("connect", [{}], timeout=WAIT)
            assert response_code(answer) == 200
            await side.next(lambda m: m.to == f"{side.url}/status" and (m.body or {}).get("value") == "live")
            layers = side.component.isolation
            assert layers["host"] == "node" and layers["network"] is False
            assert "network namespace: none without bwrap; the stub shares the host's network" in layers["missing"]
            assert side.component.counters["egress_opened"] == 1  # its WebSocket came from the broker all the same
    finally:
        await node.stop()
