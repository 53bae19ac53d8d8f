"""Observation figures: what a liveness ping, a metrics scrape and a console snapshot cost.

* ``liveness_ping_us_p50``: one ping to a deployed stub's sandbox host and its answer from the stub's loop;
* ``metrics_scrape_ms_p50``: ``GET /metrics`` of a runtime with its home stub and one foreign stub live
  (state copied, ``/proc`` read in a thread, text rendered), over HTTP on 127.0.0.1;
* ``console_state_ms_p50``: ``GET /api/state`` of the console on the same runtime.

Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp

from protofly.demo import LocalDomains
from protofly.observe.server import ObserveServer
from protofly.runtime import Runtime
from protofly.sandbox import Boundary
from protofly.sandbox.process import ProcessSandbox

PINGS = 2_000
SCRAPES = 200
STUB = (Path(__file__).resolve().parent.parent / "tests" / "stubs_src" / "echo.py").read_bytes()
RUNTIME = "hyperty-runtime://a.test/bench"


async def pings() -> float:
    sandbox = ProcessSandbox(prestart=1)
    await sandbox.start()
    try:
        component = await sandbox.deploy(
            url=f"{RUNTIME}/protostub/1",
            source=STUB,
            config={},
            classname="EchoStub",
            limits=None,
            boundary=Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain="b.test"),
            on_message=lambda msg: None,
            on_exit=lambda reason: None,
        )
        times = []
        for _ in range(PINGS):
            start = time.perf_counter()
            await component.ping(5.0)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    finally:
        await sandbox.close()


async def scrapes() -> tuple[float, float, int]:
    async with LocalDomains("a.test", "b.test") as world, Runtime(world.config("a.test")) as runtime:
        await runtime.load_stub("a.test")
        await runtime.load_stub("b.test")
        observe = ObserveServer(runtime, metrics="127.0.0.1:0", console="127.0.0.1:0")
        await observe.start()
        url = observe.urls["metrics"]
        try:
            async with aiohttp.ClientSession() as http:
                figures = []
                size = 0
                for path in ("/metrics", "/api/state"):
                    times = []
                    for _ in range(SCRAPES):
                        start = time.perf_counter()
                        async with http.get(url + path) as answer:
                            body = await answer.read()
                        times.append(time.perf_counter() - start)
                        if path == "/metrics":
                            size = len(body)
                    figures.append(statistics.median(times) * 1000)
                return figures[0], figures[1], size
        finally:
            await observe.close()


async def main() -> None:
    ping_us = await pings()
    metrics_ms, state_ms, size = await scrapes()
    print(
        json.dumps(
            {
                "liveness_ping_us_p50": round(ping_us, 1),
                "metrics_scrape_ms_p50": round(metrics_ms, 3),
                "metrics_bytes_two_stubs": size,
                "console_state_ms_p50": round(state_ms, 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
