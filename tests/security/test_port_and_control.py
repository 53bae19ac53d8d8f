"""Another stub's port, the runtime's own addresses, another domain, the sandbox control address.

A stub may deliver to local components that take traffic from outside (hyperties); never to another
stub, the runtime URL, the registry, another domain (no relaying) or the sandbox's control address.  The
victim stub's own log shows what reached it; the crash reason of a stub comes from the OS, never from
what the stub wrote before it died.
"""

from __future__ import annotations

import asyncio

from tests.security.conftest import EVIL, VICTIM, assert_confined, counter, order

from protofly.events import StubCrashed
from protofly.sandbox.channel import SANDBOX_EXTERNAL, SANDBOX_INTERNAL


async def test_a_stub_cannot_write_to_another_stub_the_runtime_or_another_domain(world) -> None:
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        tester = await runtime.new_hyperty()
        victim = (await runtime.load_stub(VICTIM)).record
        mallory = "hyperty://evil.test/mallory"
        destinations = [
            victim.url,  # the other stub's port
            f"hyperty://{VICTIM}/carol",  # another domain: would be relayed through the victim stub
            runtime.runtime_url,
            f"{runtime.runtime_url}/registry",
            f"{runtime.runtime_url}/address-allocation",
        ]
        attack = [{"type": "create", "from": mallory, "to": to, "body": {"n": n}} for n, to in enumerate(destinations)]
        await order(tester, EVIL)  # deployed and live
        records_before = len(runtime.stubs())

        await order(tester, EVIL, post=attack)

        evil = runtime.registry.stub(EVIL)
        assert_confined(evil)
        log = await tester.request(f"hyperty://{VICTIM}/log", timeout=20)
        assert [m["from"] for m in log.body["value"]["seen"]] == [tester.url]  # only the test's own request
        assert counter(evil, "forbidden_destination") == len(destinations)
        assert len(runtime.stubs()) == records_before
        assert victim.status == "live" and evil.status == "live"


async def test_the_crash_reason_comes_from_the_os_not_from_the_stub(world) -> None:
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        tester = await runtime.new_hyperty()
        await order(tester, EVIL)
        evil = runtime.registry.stub(EVIL)
        crashes: asyncio.Queue[tuple[StubCrashed, dict[str, int]]] = asyncio.Queue()

        def on_event(event: object) -> None:
            if isinstance(event, StubCrashed) and event.stub_url == evil.url:
                crashes.put_nowait((event, dict(evil.counters)))  # before a restart replaces the counters

        runtime.events.subscribe(on_event)
        lie = "the runtime's disk is full"
        control = {"value": "failed", "description": lie}
        attack = [
            {"type": "update", "from": SANDBOX_INTERNAL, "to": SANDBOX_EXTERNAL, "body": control},
            {"type": "update", "from": evil.url, "to": SANDBOX_EXTERNAL, "body": control},
        ]

        tester.post(f"hyperty://{EVIL}/attacker", "execute", {"post": attack, "exit": 1})

        crash, counters = await asyncio.wait_for(crashes.get(), 20)
        assert crash.reason.startswith("exit code 1")
        assert lie not in (evil.last_description() or "")
        # From the host's own control address the stub cannot be told from the host (they share the
        # process): its word has no effect, as the OS's reason above shows.  From any other sender it is
        # the stub writing to the control side: counted.
        assert counters.get("forged_control", 0) == 1
