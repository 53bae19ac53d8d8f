"""The cluster under real runtimes: home stubs (``stubs/msgnode``) deployed from a catalogue into sandboxes.

Each runtime of ``b.test`` is homed on one node of the three (its stub's configuration lists all three, its
own first).  Hyperties on runtimes homed on different nodes reach each other through the cluster; a node
SIGKILLed under traffic moves its runtime's stub to the next node, which claims its session, and every
request sent either way is counted against the replies and error responses that came back.
"""

from __future__ import annotations

import asyncio

from tests.integration.cluster.conftest import ClusterRuntimes

from protofly.events import RuntimeEvent, StatusChanged
from protofly.hyperty import Hyperty
from protofly.message import Message, response_code
from protofly.msgnode.process import NodeProcess
from protofly.runtime import Runtime

DOMAIN = "b.test"


def echo(msg: Message) -> dict[str, object]:
    return {"echo": msg.body["n"]}


def tally(answers: list[Message]) -> dict[int | None, int]:
    codes: dict[int | None, int] = {}
    for answer in answers:
        code = response_code(answer)
        codes[code] = codes.get(code, 0) + 1
    return codes


async def test_a_hyperty_on_a_runtime_on_node_1_asks_one_on_node_3_and_gets_the_reply(
    runtimes: ClusterRuntimes, nodes: list[NodeProcess]
) -> None:
    async with runtimes.runtime(0) as rt1, runtimes.runtime(2) as rt3:
        bob = await rt3.new_hyperty(echo)
        alice = await rt1.new_hyperty()
        answers = [await alice.request(bob.url, "execute", {"n": n}, timeout=10) for n in range(5)]
        assert tally(answers) == {200: 5}
        assert [a.body["value"]["echo"] for a in answers] == list(range(5))
        first, third = await nodes[0].stats(), await nodes[2].stats()
        # both runtimes' sessions are where their configuration put them, and the requests crossed nodes
        assert first["sessions_opened"] == 1 and third["sessions_opened"] == 1
        assert first["forwarded"] >= 5 and third["remote_in"] >= 5  # requests 1 -> 3
        assert third["forwarded"] >= 5 and first["remote_in"] >= 5  # replies 3 -> 1


async def test_node_2_killed_under_traffic_its_runtime_goes_live_on_another_node_and_every_request_is_answered(
    runtimes: ClusterRuntimes, nodes: list[NodeProcess]
) -> None:
    """The runtime on node 2 sends and receives; node 2 is SIGKILLed mid-stream.

    Its stub tries the next node of its list, ``re-open`` there claims the session (its buffer replayed and
    what the dead node had in flight sent again), and every request of both directions gets its own reply.
    """
    async with runtimes.runtime(0) as rt1, runtimes.runtime(1) as rt2:
        on_1 = await rt1.new_hyperty(echo)
        on_2 = await rt2.new_hyperty(echo)
        home = rt2.registry.stub(DOMAIN)
        assert home is not None and home.status == "live"
        live_again = asyncio.Event()
        killed = asyncio.Event()

        def watch(event: RuntimeEvent) -> None:
            if isinstance(event, StatusChanged) and event.domain == DOMAIN and event.value == "live":
                if killed.is_set():
                    live_again.set()

        unsubscribe = rt2.events.subscribe(watch)
        requests: list[asyncio.Task[Message]] = []

        def send(hyperty_from: Hyperty, to: str, n: int) -> None:
            requests.append(asyncio.create_task(hyperty_from.request(to, "execute", {"n": n}, timeout=20)))

        async def traffic(count: int) -> None:
            for _ in range(count):
                n = len(requests)
                send(on_1, on_2.url, n)  # received by the runtime on node 2
                send(on_2, on_1.url, n + 1)  # sent by it
                await asyncio.sleep(0.01)

        try:
            await traffic(50)
            assert (await nodes[1].stats())["sessions_opened"] == 1  # the runtime on node 2 is there
            loop = asyncio.get_running_loop()
            nodes[1].kill()
            killed.set()
            killed_at = loop.time()
            await nodes[1].proc.wait()
            await traffic(100)  # while the stub moves and after
            await asyncio.wait_for(live_again.wait(), timeout=15)
            moved_after = loop.time() - killed_at
            await traffic(50)
            answers = await asyncio.gather(*requests)
        finally:
            unsubscribe()
        sent = len(requests)
        assert sent == 400
        assert tally(answers) == {200: sent}, tally(answers)  # every request answered, no error, no 408
        assert [a.body["value"]["echo"] for a in answers] == list(range(sent))
        assert moved_after < 15
        claimed = [(await node.stats())["sessions_claimed"] for node in (nodes[0], nodes[2])]
        assert sum(claimed) == 1  # one of the survivors took the session over


async def test_a_thousand_subscribers_on_three_runtimes_on_three_nodes_get_every_update(
    runtimes: ClusterRuntimes, nodes: list[NodeProcess]
) -> None:
    """334 + 333 + 333 subscribers (listeners, each subscribed at its node as its own source) on three runtimes.

    The publisher is on a fourth runtime (homed on node 2): a runtime's bus hands a publication to its own
    listeners without the node, so a subscriber runtime would not publish through the cluster.
    """
    resource = "comm://b.test/room/changes"
    async with (
        runtimes.runtime(0) as rt1,
        runtimes.runtime(1) as rt2,
        runtimes.runtime(2) as rt3,
        runtimes.runtime(1) as rt_pub,
    ):
        publisher = await rt_pub.new_hyperty()
        heard: dict[str, list[int]] = {}
        probes: dict[str, int] = {}

        def listener(name: str, runtime_url: str) -> object:
            def hear(msg: Message) -> None:
                if "probe" in msg.body:
                    probes[runtime_url] = probes.get(runtime_url, 0) + 1
                else:
                    heard[name].append(msg.body["n"])

            return hear

        async def subscribe(rt: Runtime, n: int) -> None:
            source = f"{rt.runtime_url}/subscriber/{n}"
            heard[source] = []
            rt.bus.add_listener(resource, listener(source, rt.runtime_url))  # type: ignore[arg-type]
            body = {"resources": [resource], "source": source}
            sub = Message(type="subscribe", from_=f"{rt.runtime_url}/sm", to="domain://msg-node.b.test/sm", body=body)
            assert response_code(await rt.bus.request(sub, 10)) == 200

        everyone = (rt1, rt2, rt3)
        await asyncio.gather(*(subscribe(everyone[n % 3], n) for n in range(1000)))
        assert len(heard) == 1000
        # NATS spreads a new subscription between its servers asynchronously: probe until every runtime
        # hears the resource (probes are not counted), then count
        async with asyncio.timeout(10):
            probe = 0
            while len(probes) < 3:
                probe += 1
                publisher.post(resource, "update", {"probe": probe})
                await asyncio.sleep(0.05)
        updates = 20
        for n in range(updates):
            publisher.post(resource, "update", {"n": n})
        async with asyncio.timeout(10):
            while any(len(got) < updates for got in heard.values()):  # noqa: ASYNC110 - 1,000 listeners' tallies
                await asyncio.sleep(0.02)
        assert all(got == list(range(updates)) for got in heard.values())  # every update, in order, once each
        stats = [await node.stats() for node in nodes]
        assert all(s["cluster_resource_nodes"] == 3 for s in stats)
