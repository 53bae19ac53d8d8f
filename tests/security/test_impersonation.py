"""Cross-domain impersonation: a stub of evil.test speaks in the name of c.test and of c.test's node.

A foreign stub may deliver only messages whose ``from`` its own domain serves; the home domain's stub may
relay other domains' senders (that is how other runtimes reach this one through the home node), and every
delivered message says in ``body.via`` which stub it came through, whatever the stub wrote there.
"""

from __future__ import annotations

from tests.polling import wait_until
from tests.security.conftest import EVIL, HOME, PEER, VICTIM, assert_confined, counter, order

from protofly.message import Message


async def test_a_foreign_stub_cannot_deliver_in_another_domain_s_name(world) -> None:
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        received: list[Message] = []
        alice = await runtime.new_hyperty(received.append)
        tester = await runtime.new_hyperty()
        home_stub = runtime.registry.stub(HOME)
        claimed = [f"hyperty://{VICTIM}/carol", f"domain://msg-node.{VICTIM}/registry"]
        honest = "hyperty://evil.test/mallory"
        attack = [
            # The last one is from the attacker's own domain, but claims to have come through the home stub.
            {"type": "update", "from": sender, "to": alice.url, "body": {"n": n, "via": home_stub.url}}
            for n, sender in enumerate([*claimed, honest])
        ]

        await order(tester, EVIL, post=attack)

        evil = runtime.registry.stub(EVIL)
        assert_confined(evil)
        assert [(m.from_, m.body["n"]) for m in received] == [(honest, 2)]
        assert received[0].body["via"] == evil.url  # the runtime's word, not the stub's
        assert counter(evil, "forged_from") == len(claimed)


async def test_the_home_stub_relays_another_domain_s_sender_and_says_so(world) -> None:
    async with world.runtime() as runtime, world.runtime(PEER) as peer:
        received: list[Message] = []
        alice = await runtime.new_hyperty(received.append)
        bob = await peer.new_hyperty()

        bob.post(alice.url, "update", {"hello": "alice"})  # peer runtime → a.test's node → a.test's home stub

        await wait_until(lambda: len(received) == 1, timeout=20)
        home_stub = runtime.registry.stub(HOME)
        assert received[0].from_ == bob.url
        assert received[0].body["via"] == home_stub.url
        assert counter(home_stub, "forged_from") == 0
        assert counter(home_stub, "forbidden_destination") == 0
