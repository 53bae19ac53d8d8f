"""The live console's data: a snapshot of the stubs and their deploy timelines, and a push feed of events.

:class:`ConsoleFeed` subscribes once to the runtime's event stream and keeps what a page that opens now needs
(bounded: the last :data:`RECENT` events, each domain's last deployment's steps).  Every open page is a
Server-Sent Events client with a bounded queue: runtime events are pushed as they happen, and while pages
are open the stub table (counters, CPU, memory, status history) is pushed every :data:`TABLE_EVERY` seconds.
Nothing is polled by the browser; a page that does not read is dropped, never buffered without bound.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protofly.events import DeployFailed, DeployStep, RuntimeEvent, StubLive, as_json
from protofly.log import get_logger
from protofly.observe.usage import read_all
from protofly.sandbox import active_layers
from protofly.tasks import TaskSet

if TYPE_CHECKING:
    from protofly.runtime import Runtime

__all__ = ["ConsoleFeed", "stub_rows"]

log = get_logger("protofly.observe")

#: Runtime events a freshly opened page is shown.
RECENT = 200
#: Events queued per page before it counts as not reading (and is dropped).
CLIENT_BACKLOG = 1000
#: Pages open at once.
MAX_CLIENTS = 16
#: Seconds between pushes of the stub table while pages are open.
TABLE_EVERY = 1.0
#: Status changes shown per stub.
HISTORY_SHOWN = 20


@dataclass(slots=True)
class _Timeline:
    """One deployment's steps, in order; ``done`` once it went live or failed (the next step starts anew)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def stub_rows(runtime: Runtime, usage: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The stub table: one JSON-friendly row per stub."""
    rows = []
    for record in runtime.stubs():
        counters = record.counters
        found = usage.get(record.domain)
        phase = runtime.phase(record.domain)
        rows.append(
            {
                "domain": record.domain,
                "url": record.url,
                "name": record.name,
                "status": record.status,
                "description": record.last_description(),
                "since": record.since,
                "phase": None if phase is None else phase.value,
                "layers": active_layers(record.isolation),
                "missing": list(record.isolation.get("missing", ())),
                "restarts": record.restarts,
                "messages_in": counters.get("messages_to_stub", 0),
                "messages_out": counters.get("messages_from_stub", 0),
                "dropped": counters.get("dropped_to_stub", 0),
                "cpu_seconds": _rounded(None if found is None else found["cpu_seconds"]),
                "memory_bytes": None if found is None else found["memory_bytes"],
                "processes": None if found is None else found["processes"],
                "pid": record.info.get("pid"),
                "history": [
                    {"at": e.at, "value": e.value, "description": e.description, "source": e.source}
                    for e in list(record.history)[-HISTORY_SHOWN:]
                ],
            }
        )
    return rows


class ConsoleFeed:
    """What the console shows, kept current from the runtime's event stream; SSE clients subscribe here."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.time) -> None:
        self.runtime = runtime
        self._clock = clock
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.timelines: dict[str, _Timeline] = {}
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._tasks = TaskSet("console")
        self._table: asyncio.Task[None] | None = None
        #: Numbers every event: a page applies the pushed events newer than the snapshot it loaded.
        self.seq = 0
        self._unsubscribe = runtime.events.subscribe(self._on_event)

    async def close(self) -> None:
        self._unsubscribe()
        for queue in list(self._clients):
            _end(queue)
        await self._tasks.close()

    # -- what the page loads first -------------------------------------------------------------------

    async def usage(self) -> dict[str, dict[str, Any]]:
        pids = [(r.domain, r.info["pid"]) for r in self.runtime.stubs() if isinstance(r.info.get("pid"), int)]
        return await asyncio.to_thread(read_all, self.runtime, pids) if pids else {}

    async def state(self) -> dict[str, Any]:
        runtime = self.runtime
        usage = await self.usage()
        return {
            "seq": self.seq,
            "runtime": {"url": runtime.runtime_url, "domain": runtime.config.domain, "sandbox": runtime.sandbox.kind},
            "stubs": stub_rows(runtime, usage),
            "timelines": {domain: self._timeline_json(t) for domain, t in self.timelines.items()},
            "events": list(self.recent),
        }

    @staticmethod
    def _timeline_json(timeline: _Timeline) -> dict[str, Any]:
        return {"steps": timeline.steps, "outcome": timeline.outcome}

    # -- the push feed -------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[bytes | None] | None:
        """A queue of SSE frames for one page (None: too many pages are open)."""
        if len(self._clients) >= MAX_CLIENTS:
            return None
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=CLIENT_BACKLOG)
        self._clients.add(queue)
        if self._table is None or self._table.done():
            self._table = self._tasks.spawn(self._push_table(), name="console table")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(queue)

    def _on_event(self, event: RuntimeEvent) -> None:
        self.seq += 1
        line = {"seq": self.seq, "t": self._clock(), **as_json(event)}
        self.recent.append(line)
        match event:
            case DeployStep(domain=domain):
                timeline = self.timelines.get(domain)
                if timeline is None or timeline.outcome is not None:
                    timeline = self.timelines[domain] = _Timeline()
                timeline.steps.append(line)
            case StubLive(domain=domain) | DeployFailed(domain=domain):
                timeline = self.timelines.get(domain)
                if timeline is not None and timeline.outcome is None:
                    timeline.outcome = event.kind
            case _:
                pass
        self._broadcast("runtime", line)

    def _broadcast(self, kind: str, data: Any) -> None:
        frame = f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n".encode()
        for queue in list(self._clients):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                log.warning("console page does not read its events; dropping it")
                self._clients.discard(queue)
                _end(queue)

    async def _push_table(self) -> None:
        """While pages are open: the stub table (counters, usage, history) every TABLE_EVERY seconds."""
        while self._clients:
            self._broadcast("stubs", stub_rows(self.runtime, await self.usage()))
            await asyncio.sleep(TABLE_EVERY)

    async def stream(self, queue: asyncio.Queue[bytes | None], write: Callable[[bytes], Awaitable[None]]) -> None:
        """Write the queue's frames until it ends (page dropped, console closing) or the page goes away."""
        try:
            await write(b"event: hello\ndata: {}\n\n")
            while (frame := await queue.get()) is not None:
                await write(frame)
        finally:
            self.unsubscribe(queue)


def _end(queue: asyncio.Queue[bytes | None]) -> None:
    """Tell a page's stream to end, even if its queue is full."""
    while True:
        try:
            queue.put_nowait(None)
            return
        except asyncio.QueueFull:
            queue.get_nowait()
