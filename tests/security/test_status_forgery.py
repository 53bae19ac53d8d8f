"""Status forgery: a stub reports another stub as failed, on the runtime's status channel or the stub's own.

``<runtimeURL>/status`` is written by the registry alone, and a stub's status resource takes updates from
that stub alone: the registry, the event stream and the status channel must go on saying ``live`` for
the victim, its record must not collect the attacker's anomalies, and the attempt must be counted.
"""

from __future__ import annotations

from tests.security.conftest import EVIL, VICTIM, assert_confined, counter, order

from protofly.events import StatusChanged
from protofly.message import Message


async def test_a_stub_cannot_mark_another_stub_failed(world) -> None:
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        tester = await runtime.new_hyperty()
        victim = (await runtime.load_stub(VICTIM)).record
        await order(tester, EVIL)  # deployed and live
        evil = runtime.registry.stub(EVIL)
        events: list[object] = []
        runtime.events.subscribe(events.append)
        channel: list[Message] = []
        runtime.bus.add_listener(runtime.registry.runtime_status_url, channel.append)
        failed = {"value": "failed", "description": "forged: the victim's back-end is gone"}
        to_registry = [
            {
                "type": "update",
                "from": evil.url,
                "to": runtime.registry.runtime_status_url,
                "body": {**failed, "resource": victim.url},
            },
            {
                "type": "update",
                "from": "hyperty://evil.test/x",
                "to": runtime.registry.runtime_status_url,
                "body": {**failed, "resource": victim.url},
            },
            {"type": "update", "from": evil.url, "to": victim.status_url, "body": failed},
        ]
        in_victim_s_name = [{"type": "update", "from": victim.url, "to": victim.status_url, "body": failed}]

        await order(tester, EVIL, post=[*to_registry, *in_victim_s_name])

        assert_confined(evil)
        assert victim.status == "live"
        assert runtime.registry.stub(VICTIM).summary()["status"] == "live"
        assert [e for e in events if isinstance(e, StatusChanged) and e.stub_url == victim.url] == []
        assert [m.body for m in channel if (m.body or {}).get("resource") == victim.url] == []
        assert len(victim.anomalies) == 0 and victim.summary()["anomalies"] == 0  # nothing written into its record
        assert counter(evil, "forbidden_destination") == len(to_registry)
        assert counter(evil, "forged_from") == len(in_victim_s_name)
        assert evil.status == "live"
