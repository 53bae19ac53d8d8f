"""The runtime's one event stream: deploy steps, status changes, restarts and unloads as typed values.

Every observer (the admin API's NDJSON stream, the demo, the CLI, a test) subscribes once to
:class:`EventStream` and dispatches with ``match``.  Events are frozen: no observer can change what another
one sees.  Status events come from the registry alone, after the status machine accepted them, so what an
observer shows is what the registry holds — a stub cannot write this stream.

:func:`as_json` gives the stable wire form (``{"event": <kind>, ...}``) used by NDJSON and ``--json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from protofly.log import get_logger

__all__ = [
    "CrashLoop",
    "DeployFailed",
    "DeployStep",
    "EventStream",
    "Observer",
    "RestartScheduled",
    "RuntimeEvent",
    "StatusChanged",
    "StubCrashed",
    "StubLive",
    "StubUnloaded",
    "as_json",
]

log = get_logger("protofly.events")

#: Subscribers beyond this are refused: each costs a call per event on the runtime's hot path.
MAX_OBSERVERS = 256


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """The registry applied a status to a stub (the machine accepted it)."""

    kind: ClassVar[str] = "status"
    domain: str
    stub_url: str
    value: str
    description: str | None
    at: float


@dataclass(frozen=True, slots=True)
class DeployStep:
    """One step of a deployment finished (``seed`` names the seed's step numbers)."""

    kind: ClassVar[str] = "step"
    domain: str
    stub_url: str
    step: str
    seed: str
    ms: float
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class StubLive:
    """A deployment ended with the stub ``live``; its port forwards from now on."""

    kind: ClassVar[str] = "live"
    domain: str
    stub_url: str
    total_ms: float
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class DeployFailed:
    """A deployment failed; ``code`` is what waiting senders got."""

    kind: ClassVar[str] = "deployment-failed"
    domain: str
    stub_url: str
    code: int
    description: str


@dataclass(frozen=True, slots=True)
class StubCrashed:
    """A live stub's process ended; a restart follows after ``restart_in_s``."""

    kind: ClassVar[str] = "crashed"
    domain: str
    stub_url: str
    reason: str
    restart_in_s: float


@dataclass(frozen=True, slots=True)
class RestartScheduled:
    """A (re)deployment waits ``delay_s`` before it starts (backoff)."""

    kind: ClassVar[str] = "restart-scheduled"
    domain: str
    stub_url: str
    delay_s: float


@dataclass(frozen=True, slots=True)
class CrashLoop:
    """The crash budget is spent: the stub stays failed until ``retry_now``."""

    kind: ClassVar[str] = "crash-loop"
    domain: str
    stub_url: str
    reason: str
    crashes: int


@dataclass(frozen=True, slots=True)
class StubUnloaded:
    """The stub was removed (unload, or the runtime closing)."""

    kind: ClassVar[str] = "unloaded"
    domain: str
    stub_url: str
    reason: str


RuntimeEvent = (
    StatusChanged | DeployStep | StubLive | DeployFailed | StubCrashed | RestartScheduled | CrashLoop | StubUnloaded
)
Observer = Callable[[RuntimeEvent], None]


def as_json(event: RuntimeEvent) -> dict[str, Any]:
    """``{"event": kind, **fields}``: the form NDJSON streams and ``--json`` print."""
    return {"event": event.kind, **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}}


class EventStream:
    """Fan-out of runtime events to synchronous observers; an observer that raises is logged, never fatal."""

    __slots__ = ("_observers",)

    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call ``observer`` with every event from now on; returns a function that unsubscribes it."""
        if len(self._observers) >= MAX_OBSERVERS:
            raise RuntimeError(f"too many event observers (limit {MAX_OBSERVERS})")
        self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            self._observers = tuple(o for o in self._observers if o is not observer)

        return unsubscribe

    def emit(self, event: RuntimeEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception as exc:
                log.error("event observer raised", kind=event.kind, exc_info=exc)
