"""The runtime's observation listeners (aiohttp): ``/metrics`` + health, and the read-only web console.

* metrics listener (``--metrics HOST:PORT``, off by default): ``/metrics`` (Prometheus text format),
  ``/healthz`` (200 while the process serves: alive) and ``/readyz`` (200 when the home domain's stub is
  live in the sandbox kind configured — for the process sandbox, in its own process — else 503; the JSON
  body says which check failed);
* console listener (``--console HOST:PORT``): ``/`` the page (plain HTML/CSS/JS from ``static/``, no build
  step), ``/api/state`` the snapshot it loads once, ``/api/events`` the Server-Sent Events it is pushed,
  and the health endpoints too.

Both are read-only: GET only, nothing in them changes the runtime.  They bind where they are told; the
command line defaults to loopback, and a listener on any other address is logged as a warning (the console
shows stub URLs, counters and status descriptions: operator information, not for the network).
Given the same address, both share one listener.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from protofly.config import parse_listen_address
from protofly.log import get_logger
from protofly.sandbox import active_layers

if TYPE_CHECKING:
    from protofly.observe.console import ConsoleFeed
    from protofly.observe.metrics import RuntimeMetrics
    from protofly.runtime import Runtime

__all__ = ["ObserveServer", "is_loopback", "readiness"]

log = get_logger("protofly.observe")

_STATIC = {
    "/": ("index.html", "text/html"),
    "/console.js": ("console.js", "text/javascript"),
    "/console.css": ("console.css", "text/css"),
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def readiness(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Ready: the home domain's stub is live, in the sandbox kind the configuration asks for."""
    config = runtime.config
    record = runtime.registry.stub(config.domain)
    layers = [] if record is None else active_layers(record.isolation)
    home_live = record is not None and record.status == "live"
    sandbox_ok = record is not None and (config.sandbox != "process" or "process" in layers)
    checks = {
        "home_stub": {"ok": home_live, "domain": config.domain, "status": None if record is None else record.status},
        "sandbox": {
            "ok": sandbox_ok,
            "configured": config.sandbox,
            "layers": layers,
            "missing": [] if record is None else list(record.isolation.get("missing", ())),
        },
    }
    return home_live and sandbox_ok, checks


class ObserveServer:
    """Starts the metrics and console listeners a runtime was asked for; :meth:`close` stops them."""

    def __init__(self, runtime: Runtime, *, metrics: str | None = None, console: str | None = None) -> None:
        self.runtime = runtime
        self.metrics_address = metrics
        self.console_address = console
        self.metrics: RuntimeMetrics | None = None
        self.feed: ConsoleFeed | None = None
        self._runners: list[web.AppRunner] = []
        self._files: dict[str, bytes] = {}
        #: The URLs the listeners serve at (port 0 resolved), by role.
        self.urls: dict[str, str] = {}

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        apps: dict[tuple[str, int], set[str]] = {}
        if self.metrics_address is not None:
            from protofly.observe.metrics import RuntimeMetrics  # prometheus_client only when asked for

            self.metrics = RuntimeMetrics(self.runtime)
            apps.setdefault(parse_listen_address(self.metrics_address), set()).add("metrics")
        if self.console_address is not None:
            from protofly.observe.console import ConsoleFeed

            self.feed = ConsoleFeed(self.runtime)
            self._files = await asyncio.to_thread(_read_static)
            apps.setdefault(parse_listen_address(self.console_address), set()).add("console")
        for (host, port), roles in apps.items():
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/readyz", self._readyz)
            if "metrics" in roles:
                app.router.add_get("/metrics", self._metrics)
            if "console" in roles:
                for path in _STATIC:
                    app.router.add_get(path, self._static)
                app.router.add_get("/api/state", self._state)
                app.router.add_get("/api/events", self._events)
            runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0]
            url = f"http://{'[' + host + ']' if ':' in host else host}:{bound[1]}"
            for role in roles:
                self.urls[role] = url
            if not is_loopback(host):
                log.warning("observation listener bound beyond loopback: it shows operator data", url=url)
            log.info("observation listener started", url=url, serves=sorted(roles), read_only=True)

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        if self.feed is not None:
            await self.feed.close()  # ends the event streams, so the runners stop without waiting on them
        for runner in runners:
            await runner.cleanup()
        if self.metrics is not None:
            self.metrics.close()

    # -- handlers ------------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "runtime_url": self.runtime.runtime_url})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = readiness(self.runtime)
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        from protofly.observe.metrics import CONTENT_TYPE

        body = await self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _static(self, request: web.Request) -> web.Response:
        _, kind = _STATIC[request.path]
        body = self._files[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        assert self.feed is not None
        state = await self.feed.state()
        host = parse_listen_address(self.console_address or "")[0]
        state["listener"] = {"address": self.urls["console"], "loopback": is_loopback(host)}
        return web.json_response(state, dumps=_dumps)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        assert self.feed is not None
        queue = self.feed.subscribe()
        if queue is None:
            raise web.HTTPServiceUnavailable(text="too many console pages are open")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            await self.feed.stream(queue, response.write)
        except ConnectionResetError:
            pass
        finally:
            self.feed.unsubscribe(queue)
        return response


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def _read_static() -> dict[str, bytes]:
    """The console's files, read once when the listener starts (never on the event loop per request)."""
    static = resources.files("protofly.observe").joinpath("static")
    return {path: static.joinpath(name).read_bytes() for path, (name, _) in _STATIC.items()}
