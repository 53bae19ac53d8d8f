"""Forged responses: a stub guesses request ids and answers requests that were never routed to it.

Request ids are predictable (a counter per sender), so a hostile stub can post ``response`` messages for
ids 1..n addressed to a local hyperty, or to the runtime's own address-allocation sender.  A response may
settle a request only if it comes back through the stub the request went to, from the address the
request was sent to: a guess that hits a waiting request must be dropped and counted, and the victim must
get the real answer.
"""

from __future__ import annotations

import asyncio

from tests.polling import wait_until
from tests.security.conftest import EVIL, HOME, VICTIM, assert_confined, counter, order

from protofly.message import Message, response_code

CAROL = f"hyperty://{VICTIM}/carol"
GUESSES = range(1, 11)


def forged(to: str, senders: list[str], value: dict) -> list[dict]:
    """One response per guessed id and claimed sender, all addressed to ``to``."""
    return [
        {"id": guess, "type": "response", "from": sender, "to": to, "body": {"code": 200, "value": value}}
        for sender in senders
        for guess in GUESSES
    ]


async def test_a_guessed_response_does_not_settle_a_hyperty_s_request_to_another_domain(world) -> None:
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        received: list[Message] = []
        alice = await runtime.new_hyperty(received.append)
        tester = await runtime.new_hyperty()
        asking = asyncio.ensure_future(alice.request(CAROL, "execute", {"hello": "carol"}, timeout=30))
        # Started after alice's request (tasks start in order), so the victim's log shows it arrived first.
        log = await asyncio.ensure_future(tester.request(f"hyperty://{VICTIM}/log", timeout=20))
        assert [m["from"] for m in log.body["value"]["seen"]] == [alice.url, tester.url]

        attack = forged(alice.url, ["hyperty://evil.test/mallory", CAROL], {"forged": True})
        report = await order(tester, EVIL, post=attack)

        assert report == {"posted": len(attack)}
        assert not asking.done()  # no guess settled it
        assert [m for m in received if m.from_ == CAROL] == []
        evil = runtime.registry.stub(EVIL)
        assert_confined(evil)
        assert counter(evil, "forged_responses") >= 1  # the guess that hit alice's pending request id
        assert counter(evil, "forged_from") == len(GUESSES)  # every guess in carol's name

        await tester.request(f"hyperty://{VICTIM}/release", timeout=20)
        answer = await asyncio.wait_for(asking, 20)
        assert response_code(answer) == 200
        assert answer.body["value"] == {"real": True}
        assert answer.body["via"] == runtime.registry.stub(VICTIM).url
        assert counter(runtime.registry.stub(VICTIM), "forged_responses") == 0


async def test_a_guessed_response_does_not_answer_the_runtime_s_address_allocation(world) -> None:
    """During a node restart the allocation waits in the home stub: the window a forger aims at."""
    await world.publish(EVIL, "hostile.py", "Hostile")
    async with world.runtime() as runtime:
        received: dict[str, list] = {"alice": [], "newcomer": []}
        alice = await runtime.new_hyperty(received["alice"].append)
        tester = await runtime.new_hyperty()
        await order(tester, EVIL)  # the attacker is deployed and live before the node goes away
        await world.homes[HOME].stop_node()

        allocating = asyncio.ensure_future(runtime.new_hyperty(received["newcomer"].append))
        await wait_until(lambda: runtime.bus.pending_requests == 1)
        allocation = f"{runtime.runtime_url}/address-allocation"
        senders = [f"domain://msg-node.{HOME}/address-allocation", "hyperty://evil.test/node"]
        attack = forged(allocation, senders, {"allocated": [alice.url]})
        await order(tester, EVIL, post=attack)

        assert not allocating.done()
        evil = runtime.registry.stub(EVIL)
        # The guess that hit the waiting allocation is a forged response; the other guesses are addressed to
        # the runtime's own URL space, and those in the node's name claim the runtime's own domain: every
        # one dropped and counted once.
        assert counter(evil, "forged_responses") >= 1
        dropped = ("forged_responses", "forbidden_destination", "forged_from")
        assert sum(counter(evil, name) for name in dropped) == len(attack)

        await world.homes[HOME].start_node()
        newcomer = await asyncio.wait_for(allocating, 20)
        assert newcomer.url != alice.url and newcomer.url.startswith(f"hyperty://{HOME}/")
        tester.post(alice.url, "update", {"for": "alice"})
        tester.post(newcomer.url, "update", {"for": "newcomer"})
        await wait_until(lambda: len(received["alice"]) + len(received["newcomer"]) == 2)
        assert [m.body["for"] for m in received["alice"]] == ["alice"]
        assert [m.body["for"] for m in received["newcomer"]] == ["newcomer"]
