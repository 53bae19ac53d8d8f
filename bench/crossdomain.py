"""Cross-domain figures: a hyperty of ``a.test`` asks a hyperty of ``b.test``, each on its own runtime and node.

The path of a reply is what this measures.  Runtime A deploys ``b.test``'s stub to send the request (the
seed's trigger).  Runtime B answers through the stub the request arrived on (its home stub), so B deploys
nothing for the reply; a runtime that routed the reply by its destination's domain would deploy
``a.test``'s stub first.

* ``first_request_ms_p50``: a fresh pair of runtimes (each with its home stub live and its sandbox's
  pre-started host ready) — the first request from A to B and its reply, deployments included; median of
  ``ROUNDS``;
* ``stubs_in_b_after_reply``: how many stubs runtime B holds after answering (1: only its home stub);
* ``roundtrip_ms_p50/p99``: 1,000 sequential round trips between the same pair after 100 unmeasured.

Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from protofly.demo import LocalDomains
from protofly.message import response_code
from protofly.runtime import Runtime

ROUNDS = 7
TRIPS = 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_round(world: LocalDomains, scratch: Path, index: int, trips: int) -> tuple[float, int, list[float]]:
    config_a = world.config("a.test", state_dir=scratch / f"a-{index}")
    config_b = world.config("b.test", state_dir=scratch / f"b-{index}")
    async with Runtime(config_a) as a, Runtime(config_b) as b:
        bob = await b.new_hyperty(lambda msg: {"n": msg.body["n"]})
        alice = await a.new_hyperty()
        for runtime in (a, b):
            await runtime.sandbox.wait_ready()  # type: ignore[attr-defined]
        started = time.perf_counter()
        reply = await alice.request(bob.url, "execute", {"n": 0}, timeout=30)
        first = (time.perf_counter() - started) * 1000
        if response_code(reply) != 200:
            raise RuntimeError(f"first request failed: {reply.body}")
        stubs_in_b = len(b.registry.stubs())
        samples = []
        for n in range(trips):
            sent = time.perf_counter()
            reply = await alice.request(bob.url, "execute", {"n": n}, timeout=10)
            if response_code(reply) != 200:
                raise RuntimeError(f"request {n} failed: {reply.body}")
            samples.append((time.perf_counter() - sent) * 1000)
        return first, stubs_in_b, samples[100:]


async def main() -> None:
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        async with LocalDomains("a.test", "b.test") as world:
            await one_round(world, Path(scratch), -1, 0)  # warm-up: imports, caches
            firsts, stubs = [], []
            for index in range(ROUNDS):
                first, in_b, _ = await one_round(world, Path(scratch), index, 0)
                firsts.append(first)
                stubs.append(in_b)
            _, _, trips = await one_round(world, Path(scratch), 100, TRIPS + 100)
    figures["first_request_ms_p50"] = round(statistics.median(firsts), 2)
    figures["stubs_in_b_after_reply"] = max(stubs)
    figures["roundtrip_ms_p50"] = round(statistics.median(trips), 3)
    figures["roundtrip_ms_p99"] = round(pct(trips, 0.99), 3)
    figures["rounds"] = ROUNDS
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
