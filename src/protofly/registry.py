"""The Runtime Registry: the runtime's identity, its component addresses, and the table of stubs.

The registry owns three things the rest of the runtime asks about:

* the runtime URL, generated once and kept in the state directory so a restarted runtime is the same
  runtime to the message nodes that know it;
* URLs for runtime components, never handed out twice (also across restarts);
* one record per stub, keyed by the domain it serves, fed by the stub's own status messages on
  ``<stubURL>/status`` and re-published to ``<runtimeURL>/status``.

It is also the one routing table: :meth:`RuntimeRegistry.route` is a pure function of the tables that says
where a message with no local listener goes (a local component, the stub of a domain, a domain that has no
stub yet, or nowhere).  The Runtime UA asks it from the bus's resolver and acts on the answer (deploying a
stub when a domain has none); the registry never calls back into the UA.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protofly import address, status
from protofly.bus import MessageBus
from protofly.events import EventStream, StatusChanged
from protofly.log import get_logger
from protofly.message import Message, error_description
from protofly.record import MAX_DESCRIPTION, StatusEvent, StubRecord
from protofly.state import STATE_FILE, StateDirError, StateStore, check_private_dir
from protofly.throttle import LogThrottle

__all__ = [
    "Local",
    "NeedsStub",
    "RegistryError",
    "Route",
    "RuntimeRegistry",
    "StatusEvent",
    "StatusTimeoutError",
    "StubRecord",
    "ToStub",
    "Unroutable",
]

log = get_logger("protofly.registry")

#: Return paths kept for requests that arrived through a stub (oldest forgotten first).
MAX_RETURN_PATHS = 10_000
#: Destinations whose route to a stub is kept (all forgotten at once when full, or when the tables change).
MAX_CACHED_ROUTES = 4096
#: Stub numbers are reserved in blocks so that allocating one costs no disk write, yet none is reused.
RESERVE_BLOCK = 64


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown stub, duplicate domain, unreadable state)."""


class StatusTimeoutError(TimeoutError):
    """``wait_for_status`` ran out of time; the text says which stub, what it waited for and what it saw."""


@dataclass(frozen=True, slots=True)
class Local:
    """The address is inside this runtime (a component that may or may not listen)."""

    address: str


@dataclass(frozen=True, slots=True)
class ToStub:
    """Deliver to the stub at ``url`` (the stub of ``domain``, or the one a request came through)."""

    domain: str
    url: str


@dataclass(frozen=True, slots=True)
class NeedsStub:
    """``domain`` serves the address and has no stub yet: the Runtime UA may deploy one."""

    domain: str


@dataclass(frozen=True, slots=True)
class Unroutable:
    reason: str


Route = Local | ToStub | NeedsStub | Unroutable


class RuntimeRegistry:
    """The stub table and address authority of one runtime.  Create it with :meth:`open`."""

    def __init__(
        self,
        bus: MessageBus,
        *,
        domain: str,
        runtime_url: str,
        store: StateStore | None = None,
        events: EventStream | None = None,
    ) -> None:
        self.bus = bus
        #: Status changes as typed events (the runtime's one stream when it passes its own).
        self.events = events if events is not None else EventStream()
        self.domain = address.validate_domain(domain)
        self.runtime_url = runtime_url
        self.runtime_status_url = address.status_url(runtime_url)
        self._store = store
        self._stubs: dict[str, StubRecord] = {}
        self._by_url: dict[str, StubRecord] = {}
        self._blocks: dict[str, deque[list[int]]] = {}  # kind -> reserved [next, end) ranges
        self._memory_counter: dict[str, int] = {}  # without a state directory
        self._topping_up: dict[str, asyncio.Task[None]] = {}
        self._local: set[str] = set()
        #: Bumped whenever the set of local components changes: a cache of "not a local component" answers
        #: (the sandbox guard's, the boundary's) is valid only while it stays the same.
        self.local_version = 0
        self._warnings = LogThrottle(log)
        #: Oldest first; an OrderedDict because evicting the oldest of a plain dict that keeps losing its
        #: first entries scans the dead slots at its front (microseconds per message once full).
        self._return_paths: OrderedDict[tuple[str, int | str | None], str] = OrderedDict()
        #: ``to`` -> the ToStub route for a message that is not a response: route() is a pure function of the
        #: tables, so its answer is kept until a stub or a local component comes or goes (bounded).
        self._routes: dict[str, ToStub] = {}

    @classmethod
    async def open(
        cls, bus: MessageBus, *, domain: str, state_dir: Path | None = None, events: EventStream | None = None
    ) -> RuntimeRegistry:
        """Load (or create, once) the runtime URL from ``state_dir``; without one the runtime is ephemeral."""
        domain = address.validate_domain(domain)
        proposed = address.runtime_url(domain, address.new_runtime_id())
        if state_dir is None:
            registry = cls(bus, domain=domain, runtime_url=proposed, events=events)
            await registry.reserve("protostub")
            return registry
        store = StateStore(Path(state_dir) / STATE_FILE)
        try:
            await asyncio.to_thread(check_private_dir, Path(state_dir))
        except StateDirError as exc:
            raise RegistryError(str(exc)) from None
        try:
            stored = await asyncio.to_thread(store.set_default, f"runtime_url:{domain}", proposed)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot use state directory {state_dir}: {exc}") from exc
        registry = cls(bus, domain=domain, runtime_url=stored, store=store, events=events)
        await registry.reserve("protostub")
        return registry

    # -- addresses -------------------------------------------------------------------------------

    async def allocate_url(self, kind: str) -> str:
        """A new ``<runtimeURL>/<kind>/<n>``; ``n`` is never reused for this runtime, even after a restart."""
        if not kind or "/" in kind:
            raise RegistryError(f"component kind {kind!r} must be one path segment")
        number = self._take(kind)
        if number is None:
            await self._add_block(kind)
            number = self._take(kind)
        if number is None:
            raise RegistryError(f"no {kind} numbers could be reserved")
        return self._component_url(kind, number)

    def allocate_url_nowait(self, kind: str) -> str:
        """Like :meth:`allocate_url`, from numbers reserved ahead, so the routing path never waits on disk.

        Numbers are reserved in blocks and topped up in the background when half used; exhausting them
        takes half a block of allocations faster than one SQLite write, and is an error, never a reuse.
        """
        number = self._take(kind)
        if number is None:
            raise RegistryError(f"no {kind} numbers reserved; call reserve({kind!r}) or allocate_url() first")
        return self._component_url(kind, number)

    async def reserve(self, kind: str) -> None:
        """Make sure numbers of ``kind`` are reserved, so :meth:`allocate_url_nowait` can be used."""
        if self._remaining(kind) == 0:
            await self._add_block(kind)

    def _component_url(self, kind: str, number: int) -> str:
        if self._store is None and self._remaining(kind) == 0:
            self._add_memory_block(kind)
        elif self._remaining(kind) <= RESERVE_BLOCK // 2 and kind not in self._topping_up:
            task = asyncio.get_running_loop().create_task(self._add_block(kind))
            self._topping_up[kind] = task
            task.add_done_callback(lambda _: self._topping_up.pop(kind, None))
        return f"{self.runtime_url}/{kind}/{number}"

    def _take(self, kind: str) -> int | None:
        blocks = self._blocks.get(kind)
        while blocks:
            block = blocks[0]
            if block[0] < block[1]:
                block[0] += 1
                return block[0] - 1
            blocks.popleft()
        return None

    def _remaining(self, kind: str) -> int:
        return sum(end - start for start, end in self._blocks.get(kind, ()))

    async def _add_block(self, kind: str) -> None:
        if self._store is None:
            self._add_memory_block(kind)
            return
        key = f"counter:{self.runtime_url}:{kind}"
        try:
            start = await asyncio.to_thread(self._store.reserve, key, RESERVE_BLOCK)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot reserve component numbers in {self._store.path}: {exc}") from exc
        self._blocks.setdefault(kind, deque()).append([start, start + RESERVE_BLOCK])

    def _add_memory_block(self, kind: str) -> None:
        start = self._memory_counter.get(kind, 1)
        self._memory_counter[kind] = start + RESERVE_BLOCK
        self._blocks.setdefault(kind, deque()).append([start, start + RESERVE_BLOCK])

    async def close(self) -> None:
        """Finish background reservations (they only write a counter)."""
        tasks = list(self._topping_up.values())
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    # -- local components ----------------------------------------------------------------------------

    def add_local(self, url: str) -> None:
        """Declare ``url`` one of this runtime's components (a hyperty, the CLI): no stub may send in its name."""
        self._local.add(url)
        self._tables_changed()

    def remove_local(self, url: str) -> None:
        self._local.discard(url)
        self._tables_changed()

    def _tables_changed(self) -> None:
        """A local component or a stub came or went: cached routing and boundary answers are stale."""
        self.local_version += 1
        self._routes.clear()

    def local_generation(self) -> int:
        """:attr:`local_version` as a call (what the sandbox's :class:`~protofly.sandbox.Boundary` takes)."""
        return self.local_version

    def is_local_component(self, url: str) -> bool:
        """True for a declared local component or any address in the runtime's own URL space."""
        return url in self._local or address.is_within(url, self.runtime_url)

    # -- the stub table ----------------------------------------------------------------------------

    def register_stub(self, domain: str, *, name: str = "default", descriptor_url: str | None = None) -> StubRecord:
        """Allocate a stub URL for ``domain``, record it as ``deploying`` and listen on its status.

        Synchronous on purpose: the Runtime UA registers from inside the bus's resolver, and a message
        for the new stub must find its record before the next message is routed.
        """
        domain = address.validate_domain(domain)
        if domain in self._stubs:
            raise RegistryError(f"a stub for {domain} is already registered ({self._stubs[domain].url})")
        url = self.allocate_url_nowait("protostub")
        record = StubRecord(domain=domain, url=url, name=name, descriptor_url=descriptor_url)
        record._listener = self.bus.add_listener(record.status_url, self._on_status)
        self._stubs[domain] = record
        self._by_url[url] = record
        self._tables_changed()
        self.report(record, status.DEPLOYING, source="runtime")
        return record

    def unregister_stub(self, domain: str) -> StubRecord:
        """Forget the stub of ``domain``: its status listener goes, its waiters are told."""
        record = self._stubs.pop(domain, None)
        if record is None:
            raise RegistryError(f"no stub registered for {domain}")
        self._by_url.pop(record.url, None)
        self._tables_changed()
        if record._listener is not None:
            record._listener.remove()
            record._listener = None
        for _, waiter in record._waiters:
            if not waiter.done():
                waiter.set_exception(RegistryError(f"stub {record.url} for {domain} was unregistered"))
        record._waiters.clear()
        return record

    def stub(self, domain: str) -> StubRecord | None:
        return self._stubs.get(domain)

    def stub_by_url(self, url: str) -> StubRecord | None:
        return self._by_url.get(url)

    def stubs(self) -> list[StubRecord]:
        return list(self._stubs.values())

    # -- status ----------------------------------------------------------------------------------

    def report(
        self,
        record: StubRecord,
        value: str,
        description: str | None = None,
        *,
        source: str = "runtime",
    ) -> status.Transition:
        """Apply a status (from the stub, or from the runtime on its behalf), record and re-publish it."""
        transition = record.machine.report(value)
        if description is not None and len(description) > MAX_DESCRIPTION:
            description = description[:MAX_DESCRIPTION] + "…"
        event = StatusEvent(
            time.time(),
            transition.new[:MAX_DESCRIPTION],
            description,
            transition.group,
            source,
            transition.applied,
            transition.reason,
        )
        if transition.new == status.LIVE and (transition.applied or transition.reason == "repeated"):
            record.live_after_error = transition.applied and transition.old in (status.FAILED, status.DISCONNECTED)
            record.live_at = time.monotonic()
        if transition.applied:
            record.history.append(event)
            record.count("history_total")
            record.since = event.at
            self._publish(record, event)
            self.events.emit(StatusChanged(record.domain, record.url, event.value, event.description, event.at))
            self._wake(record)
        elif transition.old != transition.new:
            self._anomaly(record, event)
        return transition

    def _anomaly(self, record: StubRecord, event: StatusEvent) -> None:
        """Keep a refused status in the stub's bounded ring; one summary log line per stub and interval."""
        record.anomalies.append(event)
        total = record.count("status_anomalies")
        self._warnings.warning(
            (record.url, "status anomaly"),
            "status anomaly",
            stub_url=record.url,
            value=event.value,
            reason=event.reason,
            source=event.source,
            status_anomalies=total,
        )

    def _on_status(self, msg: Message) -> None:
        record = self._by_url.get(msg.to.removesuffix("/status"))
        if record is None:
            return
        body = msg.body or {}
        value = str(body.get("value"))[:MAX_DESCRIPTION]
        if msg.from_ != record.url:
            reason = "status from a foreign sender"
        elif status.normalize(value) in status.DEPLOYMENT:
            reason = "the deployment status is the runtime's to report"
        elif status.normalize(value) == status.EXPIRED:
            reason = "expired is the runtime's to report"
        else:
            self.report(record, value, error_description(body), source="stub")
            return
        self._anomaly(record, StatusEvent(time.time(), value, None, None, msg.from_[:MAX_DESCRIPTION], False, reason))

    def _publish(self, record: StubRecord, event: StatusEvent) -> None:
        body: dict[str, Any] = {"value": event.value, "resource": record.url}
        if event.description is not None:
            body["description"] = event.description
        self.bus.publish(Message(type="update", from_=self.runtime_url, to=self.runtime_status_url, body=body))

    def _wake(self, record: StubRecord) -> None:
        current = record.status
        remaining = []
        for wanted, waiter in record._waiters:
            if waiter.done():
                continue
            if current in wanted:
                waiter.set_result(None)
            else:
                remaining.append((wanted, waiter))
        record._waiters = remaining

    async def wait_for_status(self, stub: str | StubRecord, values: Iterable[str], timeout: float) -> StubRecord:
        """Wait until the stub's status is one of ``values``; :class:`StatusTimeoutError` after ``timeout`` s."""
        record = stub if isinstance(stub, StubRecord) else self._find(stub)
        wanted = frozenset(v for v in map(status.normalize, values) if v)
        if record.status in wanted:
            return record
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        record._waiters.append((wanted, waiter))
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise StatusTimeoutError(
                f"stub {record.url} ({record.domain}) did not reach {'/'.join(sorted(wanted))} within "
                f"{timeout:g} s; its status is {record.status}"
            ) from None
        finally:
            record._waiters = [(w, f) for (w, f) in record._waiters if f is not waiter]
        return record

    def _find(self, key: str) -> StubRecord:
        record = self._stubs.get(key) or self._by_url.get(key)
        if record is None:
            raise RegistryError(f"no stub registered for {key}")
        return record

    # -- routing ---------------------------------------------------------------------------------

    def remember_return(self, request: Message, stub_url: str) -> None:
        """A request arrived through the stub at ``stub_url``: its response goes back the same way."""
        paths = self._return_paths
        paths[(request.from_, request.id)] = stub_url
        if len(paths) > MAX_RETURN_PATHS:
            paths.popitem(last=False)

    def route(self, msg: Message) -> Route:
        """Where a message with no local listener goes; pure, apart from using up a response's return path."""
        to = msg.to
        if msg.type == "response":
            via = self._return_paths.pop((to, msg.id), None)
            record = self._by_url.get(via) if via is not None else None
            if record is not None:
                return ToStub(record.domain, record.url)
        cached = self._routes.get(to)
        if cached is not None:
            return cached
        if to in self._local or address.is_within(to, self.runtime_url):
            return Local(to)
        try:
            domain = address.serving_domain(to)
        except address.AddressError as exc:
            return Unroutable(str(exc))
        if domain is None:
            if address.parse(to).scheme != "global":
                return Unroutable(f"no domain serves {to}")
            domain = self.domain  # global services are reached through the home domain's node
        record = self._stubs.get(domain)
        if record is not None:
            route = ToStub(domain, record.url)
            if len(self._routes) >= MAX_CACHED_ROUTES:
                self._routes.clear()
            self._routes[to] = route
            return route
        return NeedsStub(domain)

    def resolve(self, msg: Message) -> str | None:
        """The bus's resolver for a registry used alone: the stub URL when :meth:`route` names one."""
        route = self.route(msg)
        return route.url if isinstance(route, ToStub) else None
