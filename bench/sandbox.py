"""Sandbox figures: stub start, channel round trips, idle memory.  Prints one JSON object.

* ``start_to_created_ms_p50``: from ``deploy()`` to the stub's ``created`` status, with a pre-started host
  (the default ``prestart=1``), under bwrap where it is installed;
* ``cold_start_to_created_ms_p50``: the same without a pre-started host (``prestart=0``): a whole Python
  start inside a new sandbox;
* ``channel_roundtrips_per_s``: runtime → stub → runtime echoes with many in flight (pipelined, batched
  frames); ``channel_roundtrips_sequential_per_s``: one at a time, each waiting for its answer;
* ``kill_to_failed_ms_p50``: from ``kill -9`` of a stub's process to its ``failed`` status (target 100 ms);
* ``idle_stub_rss_mb``: resident memory of one idle stub's whole process tree (bwrap's helpers and the
  host); ``idle_stub_host_rss_mb`` the host alone; ``idle_stub_pss_mb`` the tree's proportional share
  (shared library pages divided among the processes using them), the better estimate per extra stub.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from protofly.message import Message
from protofly.sandbox import Boundary
from protofly.sandbox.process import ProcessSandbox

STUB = (Path(__file__).resolve().parent.parent / "tests" / "stubs_src" / "echo.py").read_bytes()
RUNTIME = "hyperty-runtime://a.test/bench"
BOUNDARY = Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain="b.test")
WARM_STARTS = 15
COLD_STARTS = 5
PIPELINED = 60_000
WINDOW = 2_000
SEQUENTIAL = 2_000


class Collector:
    def __init__(self) -> None:
        self.created = asyncio.Event()
        self.failed = asyncio.Event()
        self.replies = 0
        self.target = 0
        self.done = asyncio.Event()

    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            self.replies += 1
            if self.replies >= self.target:
                self.done.set()
        elif msg.body and msg.body.get("value") == "created":
            self.created.set()
        elif msg.body and msg.body.get("value") == "failed":
            self.failed.set()


async def deploy(sandbox: ProcessSandbox, n: int, collector: Collector):
    return await sandbox.deploy(
        url=f"{RUNTIME}/protostub/{n}",
        source=STUB,
        config={},
        classname="EchoStub",
        limits=None,
        boundary=BOUNDARY,
        on_message=collector.on_message,
        on_exit=lambda reason: None,
    )


async def start_times(prestart: int, count: int) -> list[float]:
    sandbox = ProcessSandbox(prestart=prestart)
    times = []
    try:
        await sandbox.start()
        for n in range(count):
            await sandbox.wait_ready()
            collector = Collector()
            began = time.perf_counter()
            component = await deploy(sandbox, n + 1, collector)
            await asyncio.wait_for(collector.created.wait(), 30)
            times.append((time.perf_counter() - began) * 1000)
            await component.remove(grace=0.5)
    finally:
        await sandbox.close()
    return times


async def kill_times(count: int) -> list[float]:
    sandbox = ProcessSandbox(prestart=1)
    times = []
    try:
        await sandbox.start()
        for n in range(count):
            await sandbox.wait_ready()
            collector = Collector()
            component = await deploy(sandbox, n + 1, collector)
            await asyncio.wait_for(collector.created.wait(), 30)
            began = time.perf_counter()
            os.kill(component.pid, signal.SIGKILL)
            await asyncio.wait_for(collector.failed.wait(), 10)
            times.append((time.perf_counter() - began) * 1000)
    finally:
        await sandbox.close()
    return times


def message(n: int) -> Message:
    return Message(id=n, type="create", from_="hyperty://a.test/h", to="hyperty://b.test/x", body={"n": n})


async def round_trips() -> tuple[float, float, dict[str, float]]:
    sandbox = ProcessSandbox(prestart=0)
    try:
        collector = Collector()
        component = await deploy(sandbox, 1, collector)
        await asyncio.wait_for(collector.created.wait(), 30)
        # warm up (auto-connect, caches)
        collector.target = 100
        for n in range(100):
            component.post(message(n))
        await asyncio.wait_for(collector.done.wait(), 30)

        messages = [message(n) for n in range(WINDOW)]
        collector.replies, collector.target = 0, 0
        began = time.perf_counter()
        sent = 0
        while sent < PIPELINED:
            collector.target = sent + WINDOW // 2 if sent + WINDOW < PIPELINED else PIPELINED
            collector.done.clear()
            while sent - collector.replies < WINDOW and sent < PIPELINED:
                component.post(messages[sent % WINDOW])
                sent += 1
            if collector.replies < collector.target:
                await asyncio.wait_for(collector.done.wait(), 60)
        collector.target = PIPELINED
        if collector.replies < PIPELINED:
            collector.done.clear()
            await asyncio.wait_for(collector.done.wait(), 60)
        pipelined = PIPELINED / (time.perf_counter() - began)

        collector.replies = 0
        began = time.perf_counter()
        for n in range(SEQUENTIAL):
            collector.target = n + 1
            collector.done.clear()
            component.post(messages[n % WINDOW])
            await asyncio.wait_for(collector.done.wait(), 10)
        sequential = SEQUENTIAL / (time.perf_counter() - began)

        await asyncio.sleep(0.5)  # let it go idle before measuring memory
        memory = {**idle_memory(component.pid), **cgroup_memory(component.usage(), "idle_stub")}
    finally:
        await sandbox.close()
    return pipelined, sequential, memory


def tree(pid: int) -> list[int]:
    found = [pid]
    for current in found:
        try:
            found.extend(int(x) for x in Path(f"/proc/{current}/task/{current}/children").read_text().split())
        except OSError:
            continue
    return found


def _kib(path: str, field: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def idle_memory(pid: int) -> dict[str, float]:
    pids = tree(pid)
    rss = [_kib(f"/proc/{p}/status", "VmRSS") for p in pids]
    pss = [_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids]
    return {
        "idle_stub_rss_mb": round(sum(rss) / 1024, 1),
        "idle_stub_host_rss_mb": round(rss[-1] / 1024, 1),
        "idle_stub_pss_mb": round(sum(pss) / 1024, 1),
        "idle_stub_processes": len(pids),
    }


def cgroup_memory(usage: dict[str, Any] | None, prefix: str) -> dict[str, float | None]:
    """What the stub's cgroup accounts for (its whole tree: bwrap's helpers, the host, page cache it caused;
    None without a cgroup)."""
    if usage is None:
        return {f"{prefix}_cgroup_memory_mb": None, f"{prefix}_cgroup_processes": None}
    return {
        f"{prefix}_cgroup_memory_mb": round(usage["memory_bytes"] / (1 << 20), 1),
        f"{prefix}_cgroup_processes": usage["processes"],
    }


async def preloaded_memory() -> dict[str, float | None]:
    """Idle memory of a stub whose host preloaded ``websockets`` (the runtime's default ``sandbox_preload``)."""
    sandbox = ProcessSandbox(prestart=0, preload=("websockets.asyncio.client",))
    try:
        collector = Collector()
        component = await deploy(sandbox, 1, collector)
        await asyncio.wait_for(collector.created.wait(), 30)
        await asyncio.sleep(0.5)  # let it go idle before measuring memory
        return {
            "idle_stub_rss_mb_websockets_preloaded": idle_memory(component.pid)["idle_stub_rss_mb"],
            **cgroup_memory(component.usage(), "idle_stub_websockets_preloaded"),
        }
    finally:
        await sandbox.close()


async def main() -> dict[str, object]:
    warm = await start_times(prestart=1, count=WARM_STARTS)
    cold = await start_times(prestart=0, count=COLD_STARTS)
    kills = await kill_times(count=5)
    pipelined, sequential, memory = await round_trips()
    return {
        "bwrap": shutil.which("bwrap") is not None,
        "start_to_created_ms_p50": round(statistics.median(warm), 1),
        "start_to_created_ms_max": round(max(warm), 1),
        "cold_start_to_created_ms_p50": round(statistics.median(cold), 1),
        "kill_to_failed_ms_p50": round(statistics.median(kills), 1),
        "channel_roundtrips_per_s": round(pipelined),
        "channel_roundtrips_sequential_per_s": round(sequential),
        **memory,
        **await preloaded_memory(),
    }


if __name__ == "__main__":
    logging.getLogger("protofly").setLevel(logging.ERROR)  # the kill figure makes the sandbox warn, by design
    print(json.dumps(asyncio.run(main())))
