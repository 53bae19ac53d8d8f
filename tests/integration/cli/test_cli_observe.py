"""``protofly runtime serve --metrics --console``: the listeners of a real runtime process, over HTTP."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from .conftest import run, start_runtime


async def test_serve_with_metrics_and_console(world, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    runtime = await start_runtime(world, state, "--metrics", "127.0.0.1:0", "--console", "127.0.0.1:0")
    try:
        lines = {}
        for _ in range(2):
            line = (await asyncio.wait_for(runtime.proc.stdout.readline(), 10)).decode()
            role, _, rest = line.partition(": ")
            lines[role] = rest
        assert "(/metrics, /healthz, /readyz; loopback only)" in lines["metrics"]
        assert "(read-only web console; loopback only)" in lines["console"]
        metrics = lines["metrics"].split("/ ", 1)[0]
        console = lines["console"].split("/ ", 1)[0]
        code, out, err = await run("stub", "deploy", "b.test", "--state-dir", str(state))
        assert code == 0, out + err
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{metrics}/metrics") as answer:
                text = await answer.text()
            assert 'protofly_stub_status{domain="b.test"' in text
            assert 'protofly_deploy_step_seconds_count{domain="b.test",seed="3-4",step="catalogue"} 1.0' in text
            async with http.get(f"{metrics}/readyz") as answer:
                assert answer.status == 503  # a.test's own stub was never deployed: not ready
            async with http.get(f"{console}/api/state") as answer:
                state_json = json.loads(await answer.text())
            assert [row["domain"] for row in state_json["stubs"]] == ["b.test"]
            assert len(state_json["timelines"]["b.test"]["steps"]) == 5
        assert metrics == console  # the same HOST:PORT: one listener serves both
    finally:
        assert await runtime.stop() == 0
