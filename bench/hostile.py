"""Responsiveness under a hostile stub: round trips through a healthy stub while another floods the runtime.

Two stubs, each signed with its own domain's key, served by its own catalogue and deployed on demand in
the process sandbox: ``c.test`` runs an echo stub (``tests/stubs_src/echo.py``), ``evil.test`` the flood
stub of the hostile-stub suite (``tests/stubs_src/hostile_flood.py``), which writes pre-encoded batches
of status updates and deliveries straight onto its channel as fast as the runtime reads them.

* ``quiet_roundtrip_ms_p50/p99``: a local hyperty's sequential requests to ``hyperty://c.test/echo`` and
  their replies, nothing else running (``QUIET`` after 100 unmeasured);
* ``flood_roundtrip_ms_p50/p99``: the same while the flood runs (every round trip made during it);
* ``loop_lag_ms_p99``: how late a 1 ms timer fires during the flood (the event loop's responsiveness);
* ``flood_seconds``, ``flood_messages``: how long the stub took to write its flood, and how many;
* ``rss_growth_mb``: the runtime process's resident set after the flood minus before it;
* ``status_rate_limited``, ``messages_rate_limited``, ``history_len``: what the runtime made of it.

Targets (``docs/security.md``): flood p99 under 5 ms on a quiet machine, RSS growth under 20 MB.
Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from protofly.catalogue import SigningKey, publish
from protofly.catalogue.server import CatalogueServer
from protofly.demo import LocalDomains
from protofly.message import response_code
from protofly.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "tests" / "stubs_src"
QUIET = 1000
STATUSES = 1_000_000
DELIVERIES = 1_000_000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def serve(world: LocalDomains, root: Path, domain: str, source: str, classname: str) -> CatalogueServer:
    """Sign ``tests/stubs_src/<source>`` with a new key of ``domain`` (trusted by the runtime) and serve it."""
    key = SigningKey.generate(domain)
    world.trust.add(domain, key.public_raw)
    world.trust.save(world.trust_file)
    package = root / "packages" / domain
    package.mkdir(parents=True)
    shutil.copyfile(STUBS / source, package / "stub.py")
    descriptor = {
        "objectName": "default",
        "version": "1.0.0",
        "language": "python",
        "description": f"benchmark stub {source}",
        "sourceCodeClassname": classname,
        "configuration": {},
        "constraints": {},
        "interworking": False,
    }
    (package / "descriptor.json").write_text(json.dumps(descriptor))
    publish(package, root / "catalogues" / domain, key, domain)
    server = CatalogueServer(root / "catalogues" / domain, default="default")
    await server.start()
    return server


async def trip(sender: Any, n: int) -> float:
    sent = time.perf_counter()
    reply = await sender.request("hyperty://c.test/echo", "execute", {"n": n}, timeout=30)
    if response_code(reply) != 200:
        raise RuntimeError(f"round trip {n} failed: {reply.body}")
    return (time.perf_counter() - sent) * 1000


async def lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late a 1 ms sleep wakes up, for as long as the flood runs."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        samples.append((loop.time() - before - 0.001) * 1000)


async def measure(world: LocalDomains, root: Path) -> dict[str, object]:
    catalogues = {name: d.catalogue.base_url for name, d in world.domains.items()}
    servers = [
        await serve(world, root, "c.test", "echo.py", "EchoStub"),
        await serve(world, root, "evil.test", "hostile_flood.py", "Flood"),
    ]
    catalogues.update({"c.test": servers[0].base_url, "evil.test": servers[1].base_url})
    try:
        async with Runtime(world.config("a.test", catalogues=catalogues, state_dir=root / "runtime")) as runtime:
            delivered = 0

            def count(_msg: object) -> None:
                nonlocal delivered
                delivered += 1

            alice = await runtime.new_hyperty()
            target = await runtime.new_hyperty(count)
            await alice.request("hyperty://evil.test/attacker", "execute", {}, timeout=30)  # deployed, live
            quiet = [await trip(alice, n) for n in range(QUIET + 100)][100:]
            gc.collect()
            before = rss_mb()
            order = {"statuses": STATUSES, "deliveries": DELIVERIES, "to": target.url}
            flood = asyncio.ensure_future(alice.request("hyperty://evil.test/attacker", "execute", order, timeout=300))
            stop = asyncio.Event()
            lags: list[float] = []
            lagging = asyncio.ensure_future(lag(lags, stop))
            loud: list[float] = []
            while not flood.done():
                loud.append(await trip(alice, len(loud)))
            stop.set()
            await lagging
            report = (await flood).body
            if response_code(await flood) != 200:
                raise RuntimeError(f"the flood order failed: {report}")
            gc.collect()
            growth = rss_mb() - before
            evil = runtime.registry.stub("evil.test")
            assert evil is not None
            counters = evil.counters
            return {
                "quiet_roundtrip_ms_p50": round(pct(quiet, 0.5), 3),
                "quiet_roundtrip_ms_p99": round(pct(quiet, 0.99), 3),
                "flood_roundtrip_ms_p50": round(pct(loud, 0.5), 3),
                "flood_roundtrip_ms_p99": round(pct(loud, 0.99), 3),
                "flood_roundtrips": len(loud),
                "loop_lag_ms_p99": round(pct(lags, 0.99), 3) if lags else None,
                "flood_seconds": report["value"]["seconds"],
                "flood_messages": report["value"]["statuses"] + report["value"]["deliveries"],
                "rss_growth_mb": round(growth, 1),
                "status_rate_limited": counters.get("status_rate_limited", 0),
                "messages_rate_limited": counters.get("messages_rate_limited", 0),
                "delivered_to_hyperty": delivered,
                "history_len": len(evil.history),
            }
    finally:
        for server in servers:
            await server.stop()


async def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        async with LocalDomains("a.test", root=Path(scratch) / "homes") as world:
            figures = await measure(world, Path(scratch))
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
