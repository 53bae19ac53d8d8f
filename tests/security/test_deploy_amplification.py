"""Deploy amplification: messages to domains nobody has deployed, from a stub and from local code.

A stub may not address another domain at all (no relaying), so its messages to 300 new domains create no
stub record and no catalogue request.  Local code may trigger deploys on demand, but those are bounded:
total records and concurrent deploys (the excess refused, answered and counted), and a failed stub evicted
to make room leaves its domain in a negative cache that answers it until it expires.  The new domains'
catalogue is a real server that counts what it is asked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.security.conftest import EVIL, assert_confined, counter, order, runtime_counter

from protofly.catalogue.server import CatalogueServer
from protofly.message import response_code

NEW_DOMAINS = [f"n{i}.test" for i in range(300)]
#: A small stub table, so that it fills up within the test (the home stub takes one place).
MAX_STUBS = 4


async def bait_catalogue(root: Path) -> CatalogueServer:
    """A catalogue with nothing in it, standing in for whatever serves the new domains."""
    directory = root / "bait"
    directory.mkdir(parents=True)
    server = CatalogueServer(directory)
    await server.start()
    return server


def asked(server: CatalogueServer) -> int:
    return sum(server.requests.values())


async def test_a_stub_s_messages_to_new_domains_deploy_nothing(world, tmp_path) -> None:
    await world.publish(EVIL, "hostile.py", "Hostile")
    bait = await bait_catalogue(tmp_path)
    try:
        catalogues = {**world.settings()["catalogues"], **dict.fromkeys(NEW_DOMAINS, bait.base_url)}
        async with world.runtime(catalogues=catalogues) as runtime:
            tester = await runtime.new_hyperty()
            await order(tester, EVIL)
            records = {record.domain for record in runtime.stubs()}
            attack = [
                {"type": "create", "from": "hyperty://evil.test/mallory", "to": f"hyperty://{domain}/x", "body": {}}
                for domain in NEW_DOMAINS
            ]

            await order(tester, EVIL, post=attack)

            evil = runtime.registry.stub(EVIL)
            assert_confined(evil)
            assert {record.domain for record in runtime.stubs()} == records
            assert asked(bait) == 0
            assert counter(evil, "forbidden_destination") == len(NEW_DOMAINS)
    finally:
        await bait.stop()


async def test_local_code_s_on_demand_deploys_are_bounded(world, tmp_path) -> None:
    bait = await bait_catalogue(tmp_path)
    others = [*NEW_DOMAINS, "gone.test", "fresh.test"]
    try:
        catalogues = {**world.settings()["catalogues"], **dict.fromkeys(others, bait.base_url)}
        async with world.runtime(catalogues=catalogues, max_stubs=MAX_STUBS) as runtime:
            tester = await runtime.new_hyperty()
            first = await tester.request("hyperty://gone.test/x", timeout=20)
            per_deploy = asked(bait)  # what one failed deploy asks the catalogue
            assert response_code(first) >= 400 and per_deploy > 0

            answers = await asyncio.gather(
                *(tester.request(f"hyperty://{domain}/x", timeout=30) for domain in NEW_DOMAINS)
            )

            codes = [response_code(answer) for answer in answers]
            assert all(code is not None and code >= 400 and code != 408 for code in codes), codes  # each answered
            refused = runtime_counter(runtime, "deploys_refused")
            assert refused > 0
            assert len(runtime.stubs()) <= MAX_STUBS
            assert asked(bait) - per_deploy <= per_deploy * (len(NEW_DOMAINS) - refused)

            # The table is full of failed stubs: a new domain evicts one, whose domain is then answered from
            # the negative cache, without asking its catalogue again.
            held = {record.domain for record in runtime.stubs()}
            await tester.request("hyperty://fresh.test/x", timeout=20)
            evicted = held - {record.domain for record in runtime.stubs()}
            assert len(evicted) == 1
            asked_before, hits = asked(bait), runtime_counter(runtime, "negative_cache_hits")
            again = await tester.request(f"hyperty://{evicted.pop()}/x", timeout=20)
            assert response_code(again) >= 400
            assert runtime_counter(runtime, "negative_cache_hits") == hits + 1
            assert asked(bait) == asked_before
    finally:
        await bait.stop()
