"""Liveness of a JavaScript stub: the Node host answers the runtime's ping on the stub's own event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.polling import wait_until

from protofly.events import RuntimeEvent, StubCrashed
from protofly.message import Message

STUBS = Path(__file__).parent / "stubs"


async def test_a_js_stub_that_spins_under_its_cpu_limit_is_found_unresponsive(world) -> None:
    world.publish_js("cat", "bad.test", STUBS / "hostile.js", {"mode": "loop"}, sandbox={"cpuSeconds": 600})
    cat = await world.serve("cat")
    crashes: list[StubCrashed] = []
    crashed = asyncio.Event()

    def observe(event: RuntimeEvent) -> None:
        if isinstance(event, StubCrashed):
            crashes.append(event)
            crashed.set()

    async with world.runtime("y.test", {"bad.test": cat}, ping_interval=0.2, ping_timeout=0.5) as runtime:
        runtime.events.subscribe(observe)
        handle = await runtime.load_stub("bad.test")
        assert handle.isolation["host"] == "node"
        pongs = runtime.liveness.counters["pongs"]
        await wait_until(lambda: runtime.liveness.counters["pongs"] > pongs, 5)  # node's loop answers
        runtime.bus.post(Message(type="update", from_="hyperty://y.test/me", to="hyperty://bad.test/you", body={}))
        await asyncio.wait_for(crashed.wait(), 15)
        assert crashes[0].reason.startswith("unresponsive: no answer to a ping within 0.5 s"), crashes[0].reason
        assert runtime.registry.stub("bad.test").counters["unresponsive"] == 1
