"""The console's snapshot and Server-Sent Events over HTTP, during a real deploy (no browser needed)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from protofly.demo.world import LocalDomains
from protofly.observe.console import MAX_CLIENTS
from protofly.observe.server import ObserveServer
from protofly.runtime import Runtime


async def sse(response: aiohttp.ClientResponse):
    """(event, data) pairs of a text/event-stream response."""
    kind, data = None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and kind is not None:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []


async def test_events_are_pushed_and_the_snapshot_numbers_them(tmp_path: Path) -> None:
    async with LocalDomains("a.test", root=tmp_path / "world") as world, Runtime(world.config("a.test")) as runtime:
        observe = ObserveServer(runtime, console="127.0.0.1:0")
        await observe.start()
        url = observe.urls["console"]
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/api/events") as stream:
                assert stream.headers["Content-Type"] == "text/event-stream"
                events = sse(stream)
                assert await anext(events) == ("hello", {})
                async with http.get(f"{url}/api/state") as answer:
                    before = await answer.json()
                assert before["stubs"] == [] and before["listener"]["loopback"] is True
                await runtime.load_stub("a.test")
                kinds, table = [], None
                async for kind, data in events:
                    if kind == "runtime":
                        assert data["seq"] > before["seq"]
                        kinds.append(data["event"])
                    elif kind == "stubs" and "live" in kinds:
                        table = data
                        break
                assert kinds.count("step") == 5 and "live" in kinds
                assert table is not None and table[0]["domain"] == "a.test" and table[0]["status"] == "live"
                assert table[0]["memory_bytes"] > 0 and table[0]["cpu_seconds"] is not None
                async with http.get(f"{url}/api/state") as answer:
                    after = await answer.json()
                assert after["seq"] == before["seq"] + len(kinds)
                assert [s["step"] for s in after["timelines"]["a.test"]["steps"]] == [
                    "registry",
                    "catalogue",
                    "sandbox",
                    "connect",
                    "live",
                ]
                assert after["timelines"]["a.test"]["outcome"] == "live"
        finally:
            await observe.close()


async def test_pages_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async with LocalDomains("a.test", root=tmp_path / "world") as world, Runtime(world.config("a.test")) as runtime:
        observe = ObserveServer(runtime, console="127.0.0.1:0")
        await observe.start()
        url = observe.urls["console"]
        try:
            async with aiohttp.ClientSession() as http:
                streams = [await http.get(f"{url}/api/events") for _ in range(MAX_CLIENTS)]
                for stream in streams:
                    assert await anext(sse(stream)) == ("hello", {})
                async with http.get(f"{url}/api/events") as refused:
                    assert refused.status == 503
                    assert "too many console pages" in await refused.text()
                for stream in streams:
                    stream.close()
        finally:
            await observe.close()
