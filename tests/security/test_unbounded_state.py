"""Unbounded state: one stub floods the runtime with a million status updates and a million deliveries.

Per-stub history and anomalies are ring buffers with totals beside them, statuses and deliveries pass
token buckets (the excess dropped and counted), and warnings about a stub are summarised, so the
runtime's memory stays flat however long a stub keeps going.  Observed from the runtime's process: its
resident set, the rings' lengths, the counters, the log lines, and what the target hyperty received.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

from tests.security.conftest import EVIL, VICTIM, assert_confined, counter, order

from protofly.message import Message

MILLION = 1_000_000
INVALID = 200_000
GUESSED = 100_000
#: The growth of the runtime's resident set the documented bounds allow for (rings, buckets, counters).
RSS_BOUND_MB = 20
#: Warning lines a flood may cause: one summary per stub, kind and interval, over a few intervals.
WARNING_BOUND = 50
#: The rings are bounded by documented sizes well below this.
RING_BOUND = 10_000


def rss_mb() -> float:
    """The resident set of this process (the runtime runs in it), from the kernel's own account."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


async def test_a_million_statuses_and_deliveries_leave_the_runtime_flat(world, caplog) -> None:
    await world.publish(EVIL, "hostile_flood.py", "Flood")
    async with world.runtime() as runtime:
        delivered = 0

        def count(_msg: object) -> None:
            nonlocal delivered
            delivered += 1

        target = await runtime.new_hyperty(count)
        tester = await runtime.new_hyperty()
        await order(tester, EVIL)  # deployed, live, and the runtime warmed up
        evil = runtime.registry.stub(EVIL)
        assert_confined(evil)
        before = {name: counter(evil, name) for name in ("history_total", "status_anomalies")}
        gc.collect()
        rss_before = rss_mb()
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="protofly")

        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await order(
            tester, EVIL, timeout=60, statuses=MILLION, invalid=INVALID, deliveries=MILLION, to=target.url
        )
        elapsed = loop.time() - started

        gc.collect()
        growth = rss_mb() - rss_before
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert report["statuses"] == MILLION and report["deliveries"] == MILLION
        assert growth < RSS_BOUND_MB, f"the runtime grew by {growth:.1f} MB"
        assert len(evil.history) < RING_BOUND and len(evil.anomalies) < RING_BOUND
        applied = counter(evil, "history_total") - before["history_total"]
        anomalies = counter(evil, "status_anomalies") - before["status_anomalies"]
        # The bucket let through no more than its burst and its rate over the flood's duration; what it let
        # through was applied, recorded as an anomaly, or ignored as a repeat of the current value.
        passed = MILLION + INVALID - counter(evil, "status_rate_limited")
        config = runtime.config
        assert 0 < passed <= config.stub_status_burst + config.stub_status_rate * elapsed
        assert 0 < applied + anomalies <= passed
        # Every delivery was either dropped at the bucket or reached the hyperty.
        assert counter(evil, "messages_rate_limited") + delivered == MILLION
        assert len(warnings) <= WARNING_BOUND, f"{len(warnings)} warning lines, e.g. {warnings[-1].getMessage()}"
        assert evil.summary()["counters"]["status_rate_limited"] == counter(evil, "status_rate_limited")


async def test_a_hundred_thousand_guessed_responses_settle_nothing_and_are_logged_in_summary(world, caplog) -> None:
    """Responses with ids 1..1000, a hundred times over, to a hyperty whose request to c.test waits."""
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile_flood.py", "Flood")
    async with world.runtime() as runtime:
        received: list[Message] = []
        alice = await runtime.new_hyperty(received.append)
        tester = await runtime.new_hyperty()
        asking = asyncio.ensure_future(alice.request(f"hyperty://{VICTIM}/carol", "execute", {}, timeout=60))
        await asyncio.ensure_future(tester.request(f"hyperty://{VICTIM}/log", timeout=20))  # alice's is held
        await order(tester, EVIL)
        evil = runtime.registry.stub(EVIL)
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="protofly")

        report = await order(tester, EVIL, timeout=60, responses=GUESSED, to=alice.url)

        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert report["responses"] == GUESSED
        assert not asking.done()
        assert counter(evil, "forged_responses") > 0
        # Each guess was refused (it hit the waiting request), dropped at the bucket, or reached alice as an
        # unsolicited message from evil.test: never counted twice, never lost.
        from_evil = [m for m in received if m.body.get("via") == evil.url]
        assert len(from_evil) == len(received)
        assert counter(evil, "forged_responses") + counter(evil, "messages_rate_limited") + len(received) == GUESSED
        assert len(warnings) <= WARNING_BOUND, f"{len(warnings)} warning lines, e.g. {warnings[-1].getMessage()}"
        await tester.request(f"hyperty://{VICTIM}/release", timeout=20)
        answer = await asyncio.wait_for(asking, 20)
        assert answer.body["value"] == {"real": True}
