"""Liveness both ways, through the full runtime path: signed stubs from a real catalogue in real sandboxes."""

from __future__ import annotations

import asyncio

import pytest
from tests.polling import wait_until

from protofly.events import RuntimeEvent, StubCrashed
from protofly.message import Message
from protofly.supervision import Phase

FAST = {"ping_interval": 0.2, "ping_timeout": 0.5}


def poke(domain: str, n: int = 1) -> Message:
    return Message(id=n, type="update", from_="hyperty://a.test/me", to=f"hyperty://{domain}/x", body={"n": n})


@pytest.mark.parametrize("stub", ["deadlock", "spin"])
async def test_a_stub_that_blocks_its_loop_is_failed_unresponsive_and_restarted(domains, runtime_factory, stub) -> None:
    domains.publish("b.test", {}, stub=stub)
    await domains.serve("b.test")
    async with runtime_factory(**FAST) as runtime:
        crashes: list[StubCrashed] = []

        def watch(event: RuntimeEvent) -> None:
            if isinstance(event, StubCrashed):
                crashes.append(event)

        runtime.events.subscribe(watch)
        handle = await runtime.load_stub("b.test")
        first_pid = handle.record.info.get("pid")
        pongs = runtime.liveness.counters["pongs"]
        await wait_until(lambda: runtime.liveness.counters["pongs"] > pongs, 5)  # its loop answers
        runtime.bus.post(poke("b.test"))  # its loop stops (a lock it holds, or a busy loop); its process lives on
        record = await runtime.registry.wait_for_status("b.test", ["failed"], 10)
        description = record.last_description() or ""
        assert description.startswith("unresponsive: no answer to a ping within 0.5 s"), description
        assert record.counters["unresponsive"] == 1
        assert runtime.liveness.counters["unresponsive"] == 1
        await runtime.registry.wait_for_status("b.test", ["live"], 10)  # restarted under backoff
        await asyncio.wait_for(runtime.load_stub("b.test"), 10)  # the restart's deployment, finished
        assert runtime.phase("b.test") is Phase.LIVE
        assert record.restarts == 1
        assert [c.reason for c in crashes] == [description]
        assert record.info.get("pid") != first_pid


async def test_an_unrefreshed_live_status_expires_and_a_refresh_makes_it_live_again(domains, runtime_factory) -> None:
    domains.publish("b.test", {}, stub="quiet")
    await domains.serve("b.test")
    async with runtime_factory(**FAST, status_ttl=0.6, status_ttl_after_error=0.3) as runtime:
        await runtime.load_stub("b.test")
        record = await runtime.registry.wait_for_status("b.test", ["expired"], 10)
        assert record.status == "expired"
        assert (record.last_description() or "").startswith("live not refreshed for ")
        assert runtime.phase("b.test") is Phase.EXPIRED
        assert record.counters["status_expired"] == 1
        assert record.summary()["status"] == "expired"
        runtime.bus.post(poke("b.test"))  # still forwarded while expired; the stub answers by saying live
        await runtime.registry.wait_for_status("b.test", ["live"], 10)
        assert runtime.phase("b.test") is Phase.LIVE
        assert record.counters["messages_to_stub"] >= 1


@pytest.mark.parametrize("sandbox", ["process", "in-process"])
async def test_an_sdk_stub_with_a_live_connection_is_refreshed_by_its_pong(
    domains, runtime_factory, backend, sandbox
) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory(**FAST, status_ttl=0.6, sandbox=sandbox) as runtime:
        handle = await runtime.load_stub("b.test")
        pongs = runtime.liveness.counters["pongs"]
        # several times the TTL passes; the SDK's answers ({"state": "live"}) keep refreshing it
        await wait_until(lambda: runtime.liveness.counters["pongs"] >= pongs + 8, 10)
        assert handle.record.status == "live"
        assert handle.record.counters.get("status_expired", 0) == 0
