"""Any message type is routed: reTHINK's conformance ``ping``/``pong`` between hyperties of two runtimes.

The ``ping`` leaves hyperty A in runtime A, crosses runtime A's bus, b.test's stub (deployed on the fly in
a process sandbox), b.test's message node, runtime B's home stub and bus to hyperty B; hyperty B's
``pong`` goes back through runtime B's a.test stub, a.test's node and runtime A's home stub.  No part of
the path knows these types: each routes them by ``to`` alone and hands them on untouched.
"""

from __future__ import annotations

import asyncio

from protofly.message import Message, response_code


async def test_ping_and_pong_are_routed_between_hyperties_through_two_stubs_and_a_node(world) -> None:
    await world.start()
    async with world.runtime("a.test") as rt_a, world.runtime("b.test") as rt_b:
        pongs: asyncio.Queue[Message] = asyncio.Queue()
        pings: list[Message] = []
        hyperty_a = await rt_a.new_hyperty(pongs.put_nowait)

        def on_ping(msg: Message) -> None:
            pings.append(msg)
            hyperty_b.post(msg.from_, "pong", {"seq": msg.body["seq"], "payload": msg.body["payload"]})

        hyperty_b = await rt_b.new_hyperty(on_ping)
        payload = {"nested": [1, 2.5, None, "é"], "flag": True}
        for seq in range(5):
            hyperty_a.post(hyperty_b.url, "PING" if seq == 0 else "ping", {"seq": seq, "payload": payload})
        got = [await asyncio.wait_for(pongs.get(), 20) for _ in range(5)]

        assert [(p.type, p.body["seq"], p.body["payload"]) for p in pings] == [("ping", n, payload) for n in range(5)]
        assert all(p.from_ == hyperty_a.url and p.to == hyperty_b.url for p in pings)
        assert [(m.type, m.body["seq"], m.body["payload"]) for m in got] == [("pong", n, payload) for n in range(5)]
        assert all(m.from_ == hyperty_b.url and m.to == hyperty_a.url for m in got)
        # both went through stubs: each carries the via of the stub it came in through
        assert pings[0].body["via"] == rt_b.registry.stub("b.test").url
        assert got[0].body["via"] == rt_a.registry.stub("a.test").url
        for node in world.nodes.values():
            assert node.core.counters["invalid"] == 0 and node.core.counters["errors_sent"] == 0

        # a request of an unknown type is answered like any other
        hyperty_b.on_message(lambda msg: {"type": msg.type})
        answer = await hyperty_a.request(hyperty_b.url, "x-custom.probe", {}, timeout=20)
        assert response_code(answer) == 200 and answer.body["value"] == {"type": "x-custom.probe"}
