"""Headless Chromium driven over the Chrome DevTools Protocol (a WebSocket), for the console's browser tests.

No Selenium or Playwright (they download browsers): the Debian ``chromium`` package, started by the test with
``--remote-debugging-port=0`` (the port is read from its stderr), a profile in the test's temporary
directory, killed by its own process group id when the test ends.  ``--no-sandbox`` because the tests run
as root (Chromium refuses its sandbox then); the page it loads is our own console on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

#: A bound on every browser operation (start, navigation, a DOM condition).
WAIT = 20.0
_LISTENING = re.compile(rb"DevTools listening on (ws://[^\s]+)")


def chromium_binary() -> str:
    """The browser's path, or skip the test saying why (scripts/system-deps.sh installs it as root)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed and could not be (scripts/system-deps.sh installs it as root with apt)")


class Page:
    """One tab, spoken to over its DevTools WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        await self.ws.send(json.dumps({"id": number, "method": method, "params": params}))
        async with asyncio.timeout(WAIT):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("id") == number:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

    async def navigate(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout: float = WAIT) -> None:
        """Resolve when the JavaScript ``condition`` holds: checked on every DOM change, not on a timer."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }};
            if (check()) return resolve(true);
            const observer = new MutationObserver(() => {{ if (check()) {{ observer.disconnect(); resolve(true); }} }});
            observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
            setTimeout(() => {{ observer.disconnect(); reject(new Error("timed out: " + {json.dumps(condition)})); }},
                       {int(timeout * 1000)});
        }})"""
        await self.evaluate(script)

    async def screenshot(self) -> bytes:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(result["data"])


@contextlib.asynccontextmanager
async def chromium(profile: Path, *, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A headless Chromium with one page open; everything it started is killed on exit."""
    binary = chromium_binary()
    args = [
        "--headless=new",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(0, "--no-sandbox")
    process = await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so its helpers are killed with it
    )
    stderr = process.stderr
    assert stderr is not None
    try:
        seen = b""
        async with asyncio.timeout(WAIT):
            while (match := _LISTENING.search(seen)) is None:
                line = await stderr.readline()
                if not line:
                    raise RuntimeError(f"chromium exited before listening: {seen.decode(errors='replace')[-500:]}")
                seen += line
        port = int(match.group(1).split(b":")[2].split(b"/")[0])
        drain = asyncio.create_task(_drain(stderr))
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/json/list") as answer:
            targets = await answer.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
            yield Page(ws)
        drain.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), WAIT)


async def _drain(stream: asyncio.StreamReader) -> None:
    """Keep reading the browser's stderr so that it never blocks on a full pipe."""
    while await stream.read(65536):
        pass
