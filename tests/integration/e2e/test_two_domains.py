"""End to end across two domains: hyperties in two runtimes, stubs deployed on the fly from two catalogues.

Route of a request from hyperty A (``hyperty://a.test/…``, runtime A) to hyperty B (``hyperty://b.test/…``,
runtime B): runtime A finds no stub for b.test → deploys b.test's stub from b.test's catalogue (signed,
process sandbox) → b.test's node, which binds the foreign sender to A's session → runtime B's home stub →
hyperty B's handler; the reply leaves runtime B through its a.test stub (deployed on demand from a.test's
catalogue) → a.test's node → runtime A's home stub → hyperty A.
"""

from __future__ import annotations

import asyncio

from tests.polling import wait_until

from protofly.message import Message, response_code


def connection_values(record) -> list[str]:
    return [e.value for e in record.history if e.group == "connection"]


async def test_request_to_another_domain_deploys_its_stub_and_the_reply_returns(world) -> None:
    await world.start()
    async with world.runtime("a.test") as rt_a, world.runtime("b.test") as rt_b:
        hyperty_b = await rt_b.new_hyperty(lambda msg: {"echo": msg.body["n"], "from": msg.from_})
        hyperty_a = await rt_a.new_hyperty()
        assert hyperty_a.url.startswith("hyperty://a.test/") and hyperty_b.url.startswith("hyperty://b.test/")
        assert rt_a.registry.stub("b.test") is None  # nothing of b.test's is deployed in runtime A yet

        answer = await hyperty_a.request(hyperty_b.url, "execute", {"n": 7}, timeout=20)

        assert response_code(answer) == 200
        assert answer.body["value"] == {"echo": 7, "from": hyperty_a.url}
        foreign = rt_a.registry.stub("b.test")
        assert answer.body["via"] == foreign.url  # the reply came back the way the request went
        assert foreign.status == "live" and foreign.isolation.get("process") is True
        assert connection_values(foreign) == ["created", "in-progress", "live"]
        assert rt_b.registry.stub("a.test") is None  # the reply needed no stub of a.test in runtime B
        handle = await rt_a.load_stub("b.test")
        assert handle.signer and handle.catalogue_url.startswith(world.catalogues["b.test"].base_url)
        node_b = world.nodes["b.test"]
        assert node_b.core.owner(hyperty_a.url) is not None  # bound to runtime A's session on b.test's node
        assert node_b.counters["sessions"] == 2 and world.nodes["a.test"].counters["sessions"] == 1
        # The stub has no network of its own: its WebSocket runs over a socket the runtime opened for it.
        assert handle.record.counters["egress_opened"] >= 1 and handle.record.counters["egress_refused"] == 0
        network = handle.isolation["network"]
        assert network["egress"] == [world.nodes["b.test"].url] and network["namespace"]

        answers = await asyncio.gather(
            *(hyperty_a.request(hyperty_b.url, "execute", {"n": n}, timeout=20) for n in range(50))
        )
        assert [a.body["value"]["echo"] for a in answers] == list(range(50))


async def test_fire_and_forget_messages_arrive_in_order_and_errors_come_back(world) -> None:
    await world.start()
    async with world.runtime("a.test") as rt_a, world.runtime("b.test") as rt_b:
        received: list[int] = []
        done = asyncio.Event()

        def on_b(msg: Message) -> None:
            received.append(msg.body["n"])
            if len(received) == 500:
                done.set()

        hyperty_b = await rt_b.new_hyperty(on_b)
        errors: list[Message] = []
        hyperty_a = await rt_a.new_hyperty(errors.append)
        await rt_a.load_stub("b.test")
        for n in range(500):
            hyperty_a.post(hyperty_b.url, "update", {"n": n, "pad": "x" * 100})
        await asyncio.wait_for(done.wait(), 20)
        assert received == list(range(500))
        assert errors == []

        gone = "hyperty://b.test/00000000-0000-4000-8000-000000000000"
        answer = await hyperty_a.request(gone, "execute", {"n": 1}, timeout=10)
        assert response_code(answer) == 404 and "no route" in answer.body["description"]


async def test_unload_disconnects_with_a_normal_closure(world) -> None:
    await world.start()
    async with world.runtime("a.test") as rt_a:
        handle = await rt_a.load_stub("b.test")
        node_b = world.nodes["b.test"]
        assert node_b.counters["sessions"] == 1
        record = await rt_a.unload_stub("b.test")
        assert connection_values(record)[-1] == "disconnected"
        assert record.last_description() == "1000 (normal closure): session closed"
        await wait_until(lambda: node_b.counters["sessions"] == 0, timeout=5)  # closed, not left detached
        assert handle.record is record


async def test_a_node_that_refuses_the_token_fails_the_deployment(world) -> None:
    await world.start(auth_tokens=["right-token"])
    async with world.runtime("a.test") as rt_a:
        answer = await rt_a.bus.request(
            Message(type="execute", from_="hyperty://a.test/someone", to="hyperty://b.test/x", body={}), timeout=15
        )
        assert response_code(answer) == 503
        assert "401" in answer.body["description"] and "accessToken" in answer.body["description"]
        assert rt_a.registry.stub("b.test").status == "deployment-failed"


async def test_restarting_b_node_while_messages_flow_loses_no_accepted_message(world) -> None:
    """b.test's node stops gracefully (drain, state file) and comes back on its port under live traffic.

    Both stubs on it (runtime A's stub for b.test, runtime B's home stub) go ``disconnected`` → ``live``
    by ``re-open``, keeping their addresses; every message hyperty A posted is counted at hyperty B.
    """
    state_file = world.root / "b-node-state.json"
    await world.start(per_domain={"b.test": {"state_file": state_file}})
    async with world.runtime("a.test") as rt_a, world.runtime("b.test") as rt_b:
        received: list[int] = []
        progress = asyncio.Event()

        def on_b(msg: Message) -> dict | None:
            if msg.type == "execute":
                return {"pong": msg.body["n"]}
            received.append(msg.body["n"])
            progress.set()
            return None

        async def until_received(count: int, timeout: float) -> None:
            async with asyncio.timeout(timeout):
                while len(received) < count:
                    progress.clear()
                    await progress.wait()

        hyperty_b = await rt_b.new_hyperty(on_b)
        errors: list[Message] = []
        hyperty_a = await rt_a.new_hyperty(errors.append)
        await rt_a.load_stub("b.test")
        foreign, home_b = rt_a.registry.stub("b.test"), rt_b.registry.stub("b.test")
        sent = 0
        stop_at: int | None = None

        async def send() -> None:
            nonlocal sent
            while stop_at is None or sent < stop_at:
                hyperty_a.post(hyperty_b.url, "update", {"n": sent})
                sent += 1
                if sent % 5 == 0:
                    await asyncio.sleep(0.001)  # pacing: traffic must still flow while the node restarts

        sender = asyncio.create_task(send())
        await until_received(100, timeout=15)
        node_b = world.nodes["b.test"]
        port = node_b.port
        await node_b.stop()
        before_restart = sent
        restarted = await world.start_node("b.test", port=port, state_file=state_file)
        await rt_a.registry.wait_for_status(foreign, ["live"], timeout=15)
        await rt_b.registry.wait_for_status(home_b, ["live"], timeout=15)
        stop_at = sent + 200
        await asyncio.wait_for(sender, 15)
        await until_received(sent, timeout=20)

        assert received == list(range(sent))  # not one accepted message lost, none doubled, in order
        assert errors == []  # and every message was accepted
        assert before_restart > 100  # messages were posted while the node was down or draining
        for record in (foreign, home_b):
            values = connection_values(record)
            assert values[:3] == ["created", "in-progress", "live"]
            assert values[-3:] == ["disconnected", "in-progress", "live"]
            down = [e for e in record.history if e.value == "disconnected"][-1]
            assert down.description.startswith("1001 (going away)") and "drained" in down.description
        assert restarted.counters["sessions_reopened"] >= 2
        assert restarted.core.owner(hyperty_b.url) is not None  # the address survived the restart

        answer = await hyperty_a.request(hyperty_b.url, "execute", {"n": -1}, timeout=10)
        assert response_code(answer) == 200 and answer.body["value"] == {"pong": -1}  # both ways still work
