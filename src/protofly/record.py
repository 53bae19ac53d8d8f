"""A stub's record: everything the runtime knows about one deployed stub, bounded whatever the stub does.

The registry owns the records (one per domain); the runtime, the admin API and the console read them.  A
record's status history and its refused statuses are rings of fixed size with running totals, and its
counters are the sandbox's (per deployment) and the runtime's own (kept across restarts), so a stub that
floods cannot grow what the runtime keeps about it (``docs/security.md``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protofly import address, status
from protofly.bus import Listener

__all__ = ["ANOMALY_LIMIT", "HISTORY_LIMIT", "MAX_DESCRIPTION", "TRUST_COUNTERS", "StatusEvent", "StubRecord"]

#: Applied statuses kept per stub (a deploy timeline needs a handful; a flood keeps only the newest).
HISTORY_LIMIT = 256
#: Refused statuses kept per stub.
ANOMALY_LIMIT = 64
#: Longest status value or description kept; longer ones are cut (a status is not a payload).
MAX_DESCRIPTION = 512
#: The runtime's counters about each stub (see ``docs/security.md``).
TRUST_COUNTERS = (
    "history_total",
    "status_anomalies",
    "forged_responses",
    "forbidden_destination",
    "status_rate_limited",
    "messages_rate_limited",
)


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One status report, applied or not: the raw material of a deploy timeline."""

    at: float
    value: str
    description: str | None
    group: str | None
    source: str
    applied: bool
    reason: str | None = None


@dataclass(eq=False)
class StubRecord:
    """Everything the runtime knows about one deployed stub."""

    domain: str
    url: str
    name: str = "default"
    descriptor_url: str | None = None
    #: The last :data:`HISTORY_LIMIT` applied statuses (``counters["history_total"]`` counts them all).
    history: deque[StatusEvent] = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))
    #: The last :data:`ANOMALY_LIMIT` refused statuses (``counters["status_anomalies"]`` counts them all).
    anomalies: deque[StatusEvent] = field(default_factory=lambda: deque(maxlen=ANOMALY_LIMIT))
    since: float = field(default_factory=time.time)
    isolation: dict[str, Any] = field(default_factory=dict)
    #: The sandbox component's counters (frames, forged senders, ...); replaced by each deployment.
    sandbox_counters: dict[str, int] = field(default_factory=dict)
    #: The runtime's counters about this stub (trust boundary, status); kept across restarts.
    trust_counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRUST_COUNTERS, 0))
    restarts: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    machine: status.StatusMachine = field(default_factory=status.StatusMachine, repr=False)
    _waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = field(default_factory=list, repr=False)
    _listener: Listener | None = field(default=None, repr=False)

    @property
    def status(self) -> str | None:
        return self.machine.current

    @property
    def deployment(self) -> str | None:
        return self.machine.deployment

    @property
    def connection(self) -> str | None:
        return self.machine.connection

    @property
    def counters(self) -> dict[str, int]:
        """Every counter about this stub: the sandbox's and the runtime's (a snapshot)."""
        return {**self.sandbox_counters, **self.trust_counters}

    def count(self, name: str, amount: int = 1) -> int:
        counters = self.trust_counters
        value = counters.get(name, 0) + amount
        counters[name] = value
        return value

    @property
    def waiting(self) -> int:
        """How many ``wait_for_status`` calls wait on this stub now (none is left behind by a timeout)."""
        return len(self._waiters)

    @property
    def status_url(self) -> str:
        return address.status_url(self.url)

    def last_description(self) -> str | None:
        """The reason given with the current status (a failure's cause), if any."""
        for event in reversed(self.history):
            if event.applied:
                return event.description
        return None

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view for ``stub list`` and status APIs."""
        return {
            "domain": self.domain,
            "url": self.url,
            "name": self.name,
            "status": self.status,
            "description": self.last_description(),
            "cause": self.info.get("cause"),
            "since": self.since,
            "isolation": self.isolation,
            "counters": self.counters,
            "restarts": self.restarts,
            "anomalies": self.trust_counters.get("status_anomalies", 0),
        }
