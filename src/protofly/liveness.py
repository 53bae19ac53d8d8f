"""Liveness both ways: the runtime pings every live stub's event loop, and a ``live`` status has a time to live.

* **Pings.** Every ``ping_interval`` seconds each live stub's sandbox host gets a ``ping`` control message;
  the host answers it on the event loop the stub runs on (:func:`protofly.stub.pong`), so a stub that blocks
  its loop — a busy loop under its CPU limit, a deadlock — leaves it unanswered.  No answer within
  ``ping_timeout`` and the process is killed (:meth:`~protofly.sandbox.Component.kill_unresponsive`); its
  exit arrives at the lifecycle as an ordinary crash, ``failed: unresponsive: ...``, restarted under backoff.
  A stub that blocked is thus found at most ``ping_interval + ping_timeout`` seconds later.
* **Status time to live.** A ``live`` status expires (``expired``) unless refreshed within ``status_ttl``
  seconds (``status_ttl_after_error`` for a ``live`` that follows a failure or a disconnection): by the stub
  publishing ``live`` again, or by the SDK's answer to a ping saying its connection is ``live``.  A refresh
  of an expired stub makes it ``live`` again.

The decisions are plain functions (:func:`expiry`, :func:`pong_refreshes`) unit-tested without time; the
:class:`LivenessMonitor` is the thin asyncio shell that runs them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from protofly import status
from protofly.events import EventStream, RuntimeEvent, StatusChanged
from protofly.log import get_logger
from protofly.registry import RuntimeRegistry, StubRecord
from protofly.sandbox import Component, SandboxError
from protofly.supervision import Event, Expired, Phase, Refreshed
from protofly.tasks import TaskSet

__all__ = ["LivenessMonitor", "LivenessPolicy", "Watched", "expiry", "pong_refreshes"]

log = get_logger("protofly.liveness")

#: Phases in which a stub has a process that should answer.
WATCHED_PHASES = (Phase.LIVE, Phase.EXPIRED)


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """The liveness knobs (from :class:`protofly.config.RuntimeConfig`)."""

    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    status_ttl: float = 240.0
    status_ttl_after_error: float = 60.0


class Watched(Protocol):
    """What the monitor needs of one stub (the runtime's stub entry)."""

    domain: str
    record: StubRecord
    component: Component | None

    @property
    def phase(self) -> Phase: ...


def expiry(record: StubRecord, policy: LivenessPolicy) -> float | None:
    """When (``time.monotonic``) the stub's ``live`` expires; None if it is not ``live`` now."""
    if record.connection != status.LIVE or record.live_at is None:
        return None
    ttl = policy.status_ttl_after_error if record.live_after_error else policy.status_ttl
    return record.live_at + ttl


def pong_refreshes(answer: dict[str, Any] | None) -> bool:
    """Whether a ping's answer refreshes the ``live`` status: the SDK says the stub's connection is live."""
    return bool(answer) and answer.get("state") == status.LIVE  # type: ignore[union-attr]


class LivenessMonitor:
    """Pings live stubs and expires unrefreshed ``live`` statuses; one owned task, stopped by :meth:`close`."""

    def __init__(
        self,
        policy: LivenessPolicy,
        *,
        registry: RuntimeRegistry,
        events: EventStream,
        stubs: Callable[[], Iterable[Watched]],
        lookup: Callable[[str], Watched | None],
        feed: Callable[[Any, Event], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._registry = registry
        self._stubs = stubs
        self._lookup = lookup
        #: Hands an event to a stub's lifecycle machine and performs what it returns (the runtime's shell).
        self._feed = feed
        self._clock = clock
        self._tasks = TaskSet("liveness")
        self._in_flight: set[str] = set()
        #: Pings sent, answered and unanswered (stubs killed as unresponsive), statuses expired.
        self.counters = {"pings": 0, "pongs": 0, "unresponsive": 0, "expired": 0}
        self._unsubscribe = events.subscribe(self._on_event)

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="liveness")

    async def close(self) -> None:
        self._unsubscribe()
        await self._tasks.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.ping_interval)
            self.tick()

    def tick(self) -> None:
        """One round: expire what was not refreshed, ping every live stub that has no ping in flight."""
        now = self._clock()
        for stub in list(self._stubs()):
            if stub.phase not in WATCHED_PHASES:
                continue
            deadline = expiry(stub.record, self.policy)
            if deadline is not None and now >= deadline:
                self._expire(stub, now - (stub.record.live_at or now))
            component = stub.component
            if component is not None and stub.domain not in self._in_flight:
                self._in_flight.add(stub.domain)
                self._tasks.spawn(self._ping(stub, component), name=f"ping {stub.domain}")

    def _expire(self, stub: Watched, age: float) -> None:
        self.counters["expired"] += 1
        stub.record.count("status_expired")
        description = f"live not refreshed for {age:.1f} s"
        self._registry.report(stub.record, status.EXPIRED, description, source="runtime")
        self._feed(stub, Expired())

    async def _ping(self, stub: Watched, component: Component) -> None:
        try:
            self.counters["pings"] += 1
            answer = await component.ping(self.policy.ping_timeout)
        except TimeoutError:
            self.counters["unresponsive"] += 1
            stub.record.count("unresponsive")
            component.kill_unresponsive(f"no answer to a ping within {self.policy.ping_timeout:g} s")
            return
        except SandboxError:
            return  # it ended meanwhile: its exit is reported by the sandbox
        finally:
            self._in_flight.discard(stub.domain)
        self.counters["pongs"] += 1
        if pong_refreshes(answer) and stub.component is component and stub.phase in WATCHED_PHASES:
            self._registry.report(stub.record, status.LIVE, source="sdk")

    def _on_event(self, event: RuntimeEvent) -> None:
        """A ``live`` applied to an expired stub (the stub's or the SDK's refresh) makes its lifecycle live."""
        if isinstance(event, StatusChanged) and event.value == status.LIVE:
            stub = self._lookup(event.domain)
            if stub is not None and stub.phase is Phase.EXPIRED:
                self._feed(stub, Refreshed())
