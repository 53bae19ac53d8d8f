"""The live console in a real headless Chromium, during a real deploy (catalogue, sandbox, message node)."""

from __future__ import annotations

from pathlib import Path

from tests.chromium import chromium

from protofly.demo.world import LocalDomains
from protofly.events import DeployStep, RuntimeEvent
from protofly.observe.server import ObserveServer
from protofly.runtime import Runtime

ROW = "document.querySelector('tr[data-domain=\"a.test\"]')"
BARS = "document.querySelectorAll('svg.timeline[data-domain=\"a.test\"] rect.step')"


async def test_the_console_shows_a_stub_going_live_and_its_timeline(tmp_path: Path) -> None:
    async with LocalDomains("a.test", root=tmp_path / "world") as world, Runtime(world.config("a.test")) as runtime:
        observe = ObserveServer(runtime, console="127.0.0.1:0")
        await observe.start()
        try:
            async with chromium(tmp_path / "profile") as page:
                await page.navigate(observe.urls["console"] + "/")
                await page.wait_for("document.body.dataset.loaded === '1'")  # snapshot loaded, events flowing
                assert await page.evaluate(f"{ROW} === null")  # nothing deployed yet
                assert "loopback only" in await page.evaluate("document.getElementById('listener').textContent")
                steps: list[DeployStep] = []

                def on_event(event: RuntimeEvent) -> None:
                    if isinstance(event, DeployStep) and event.domain == "a.test":
                        steps.append(event)

                runtime.events.subscribe(on_event)
                await runtime.load_stub("a.test")  # the home stub: signed, fetched, sandboxed, connected
                await page.wait_for(f"{ROW}.querySelector('.status').textContent === 'live'")
                await page.wait_for(f"{BARS}.length === {len(steps)}")
                bars = await page.evaluate(f"[...{BARS}].map((bar) => bar.dataset.step)")
                assert bars == [step.step for step in steps]
                assert bars == ["registry", "catalogue", "sandbox", "connect", "live"]  # one bar per seed step
                widths = await page.evaluate(f"[...{BARS}].map((bar) => Number(bar.getAttribute('width')))")
                assert all(width > 0 for width in widths)
                history = await page.evaluate(
                    "[...document.querySelectorAll('.card[data-domain=\"a.test\"] .history .status')]"
                    ".map((s) => s.textContent)"
                )
                assert history[0] == "live" and "deploying" in history  # newest first
                kinds = await page.evaluate("[...document.querySelectorAll('#events li')].map((li) => li.dataset.kind)")
                assert "live" in kinds and "step" in kinds
                # the table push (counters, layers, usage) follows within a second
                await page.wait_for(f"{ROW}.querySelector('.layers').textContent.startsWith('process')")
                memory = await page.evaluate(f"{ROW}.querySelectorAll('td.num')[4].textContent")
                assert memory.endswith("MiB"), memory
                png = await page.screenshot()
                assert png.startswith(b"\x89PNG\r\n\x1a\n")
                (tmp_path / "console.png").write_bytes(png)
        finally:
            await observe.close()
