"""Deploy figures: a cold deploy (trigger → live) with catalogue download, verification, process sandbox and
WebSocket connection to a message node on 127.0.0.1, split per step; and a warm ``load_stub``.

Each cold deploy uses a new runtime with an empty state directory (so nothing is cached) whose sandbox has
its pre-started host ready, as in a runtime that has been up for a moment.  The first-deploy figure is
the same without waiting for the pre-started host.  Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from protofly.demo import LocalDomains
from protofly.runtime import Runtime

ROUNDS = 25


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def cold(world: LocalDomains, scratch: Path, index: int, *, ready: bool) -> tuple[float, dict[str, float]]:
    config = world.config("a.test", state_dir=scratch / f"rt-{index}-{ready}")
    async with Runtime(config) as runtime:
        if ready:
            await runtime.sandbox.wait_ready()  # type: ignore[attr-defined]
        started = time.perf_counter()
        handle = await runtime.load_stub("b.test")
        total = (time.perf_counter() - started) * 1000
        steps = {step.name: step.ms for step in handle.steps}
        for step in handle.steps:
            steps.update({f"{step.name}_{part}": ms for part, ms in step.parts.items()})
        return total, steps


async def main() -> None:
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        async with LocalDomains("a.test", "b.test") as world:
            for warmup in range(2):
                await cold(world, Path(scratch), -1 - warmup, ready=True)
            totals, per_step = [], {}
            for index in range(ROUNDS):
                total, steps = await cold(world, Path(scratch), index, ready=True)
                totals.append(total)
                for name, ms in steps.items():
                    per_step.setdefault(name, []).append(ms)
            first = [(await cold(world, Path(scratch), 1000 + i, ready=False))[0] for i in range(5)]
            figures["cold_deploy_ms_p50"] = round(statistics.median(totals), 2)
            figures["cold_deploy_ms_p95"] = round(pct(totals, 0.95), 2)
            for name, values in per_step.items():
                figures[f"cold_step_{name}_ms_p50"] = round(statistics.median(values), 3)
            figures["first_deploy_no_spare_ms_p50"] = round(statistics.median(first), 2)

            async with Runtime(world.config("a.test", state_dir=Path(scratch) / "warm")) as runtime:
                await runtime.load_stub("b.test")
                samples = []
                for _ in range(20_000):
                    started = time.perf_counter_ns()
                    await runtime.load_stub("b.test")
                    samples.append((time.perf_counter_ns() - started) / 1000)
                figures["warm_load_us_p50"] = round(statistics.median(samples), 2)
    figures["rounds"] = ROUNDS
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
