"""Saved state (``ProtoStub.save_state``): a stub keeps only its own, bounded, and cannot write another's."""

from __future__ import annotations

from tests.security.conftest import EVIL, VICTIM, assert_confined, counter, order

from protofly.session_store import MAX_STATE_BYTES


async def test_a_stub_cannot_save_oversized_state_or_state_for_another_stub(world) -> None:
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        tester = await runtime.new_hyperty()
        victim = (await runtime.load_stub(VICTIM)).record
        await order(tester, EVIL)  # deployed and live
        evil = runtime.registry.stub(EVIL)
        before = runtime.sessions.saved(VICTIM)
        attack = [
            {"type": "update", "from": evil.url, "to": f"{evil.url}/state", "body": {"value": "x" * MAX_STATE_BYTES}},
            {"type": "update", "from": evil.url, "to": f"{victim.url}/state", "body": {"value": {"session": "mine"}}},
            {"type": "update", "from": victim.url, "to": f"{victim.url}/state", "body": {"value": {"session": "mine"}}},
        ]

        await order(tester, EVIL, post=attack)

        assert_confined(evil)
        assert runtime.sessions.saved(EVIL) is None  # the oversized state was refused
        assert runtime.sessions.counters(EVIL)["state_refused"] == 1
        assert runtime.sessions.saved(VICTIM) == before  # nothing written in the victim's name
        assert counter(evil, "forbidden_destination") == 1  # another stub's state resource is the runtime's
        assert counter(evil, "forged_from") == 1  # the victim's own address is not the attacker's to use
        assert evil.status == "live" and victim.status == "live"
