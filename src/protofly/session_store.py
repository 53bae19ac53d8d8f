"""What outlives a stub's process: the state it saved, and the messages it had not handed on yet.

A protocol stub holds a session with its back-end (for the message node: the runtime token, the numbers
of acknowledged delivery).  When its sandbox process dies -- a crash, a SIGKILL, its memory limit -- the
runtime restarts it; this module makes the restart lossless:

* **saved state** -- the stub calls ``ProtoStub.save_state(obj)``, which sends ``update`` to
  ``<stub url>/state``; the runtime hands it to :meth:`SessionStore.save` (it never reaches the bus, so
  the trust boundary's destination rule is not involved), and the store keeps the latest ``obj`` per
  domain (JSON, at most :data:`MAX_STATE_BYTES`; a larger one is refused and counted) and the deploy
  pipeline hands it to the next instance of that domain's stub as ``config["savedState"]``.  A stub's
  state reaches only its own domain's next stub: it is keyed by the domain the runtime deployed it for,
  never by anything the stub says;
* **hand-over ledger** -- every message the runtime posts to a stub is numbered (1, 2, ... per stub
  instance) and kept until the stub reports it done with (``handedOver`` in the same ``update``:
  acknowledged by its back-end, or answered).  When the instance dies, what is left is posted, in order,
  to the next instance as soon as it is live, before anything that waited meanwhile; if no next instance
  comes (the crash budget is spent, the stub is unloaded, its deployment fails) each request it held, and
  each request whose answer could only come back through it, is answered ``503`` at once, never left to
  its request timeout.  The ledger is kept only for a stub that
  reports ``handedOver`` (the message node's does); for others a crash loses what the process held, as
  before, and their senders wait for their request timeout.

The ledger is bounded (:data:`MAX_TRACKED` messages per domain); beyond it the oldest entry is forgotten
and counted in ``untracked`` (such a message may be lost in a crash, as without this module).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protofly.bus import BusClosedError, MessageBus
from protofly.log import get_logger
from protofly.message import Message, response
from protofly.sandbox import Component

__all__ = ["MAX_STATE_BYTES", "MAX_TRACKED", "SessionStore", "TrackedComponent"]

#: Largest saved state per domain (its JSON encoding).
MAX_STATE_BYTES = 64 << 10
#: Messages per domain kept until the stub hands them over.
MAX_TRACKED = 100_000

_log = get_logger("protofly.session_store")


@dataclass
class _Domain:
    """One domain's saved state and the ledger of its current stub instance."""

    stub_url: str
    state: Any = None
    #: Messages posted to the current instance and not handed over yet, oldest first.  Their numbers are
    #: consecutive, so they are not stored: the last one is ``posted`` (no tuple per message to allocate).
    ledger: deque[Message] = field(default_factory=deque)
    #: Messages posted to the current instance so far (the last number given).
    posted: int = 0
    #: Left by a dead instance, for the next one.
    leftovers: list[Message] = field(default_factory=list)
    #: The stub reports ``handedOver``: only then is a ledger kept (a stub that never reports would have
    #: every message it was ever given re-sent after a crash).
    reports: bool = False
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("saved", "state_refused", "handed_over", "redelivered", "abandoned", "untracked"), 0
        )
    )


class TrackedComponent(Component):
    """A stub's component whose every accepted ``post`` is entered in its domain's ledger."""

    def __init__(self, inner: Component, entry: _Domain) -> None:
        self.inner = inner
        self._entry = entry
        self.url = inner.url
        self.isolation = inner.isolation
        self.counters = inner.counters

    @property  # the process is the inner component's
    def pid(self) -> int | None:
        return self.inner.pid

    @pid.setter
    def pid(self, value: int | None) -> None:
        self.inner.pid = value

    def post(self, msg: Message) -> bool:
        if not self.inner.post(msg):
            return False
        entry = self._entry
        if not entry.reports:
            return True
        entry.posted += 1
        ledger = entry.ledger
        if len(ledger) >= MAX_TRACKED:
            ledger.popleft()
            entry.counters["untracked"] += 1
        ledger.append(msg)
        return True

    async def execute(self, method: str, params: list[Any] | None = None, *, timeout: float) -> Message:
        return await self.inner.execute(method, params, timeout=timeout)

    async def remove(self, grace: float = 2.0) -> None:
        await self.inner.remove(grace)

    def usage(self) -> dict[str, Any] | None:  # defined on Component, so __getattr__ would not pass it on
        return self.inner.usage()

    def deploy_parts(self) -> dict[str, float]:
        return self.inner.deploy_parts()

    async def ping(self, timeout: float) -> dict[str, Any] | None:  # liveness: the real component's
        return await self.inner.ping(timeout)

    def kill_unresponsive(self, detail: str) -> None:
        self.inner.kill_unresponsive(detail)

    def __getattr__(self, name: str) -> Any:  # state, exit_reason, ...: the real component's
        return getattr(self.inner, name)


class SessionStore:
    """Saved stub state and hand-over ledgers, per domain (see the module docstring)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._domains: dict[str, _Domain] = {}

    def counters(self, domain: str) -> dict[str, int]:
        entry = self._domains.get(domain)
        return dict(entry.counters) if entry is not None else {}

    def saved(self, domain: str) -> Any:
        """The state the last instance of ``domain``'s stub saved (None if none)."""
        entry = self._domains.get(domain)
        return None if entry is None else entry.state

    def pending(self, domain: str) -> int:
        """Messages of ``domain``'s stub not handed over yet (current instance and leftovers)."""
        entry = self._domains.get(domain)
        return 0 if entry is None else len(entry.ledger) + len(entry.leftovers)

    def track(self, domain: str, component: Component) -> TrackedComponent:
        """A new instance of ``domain``'s stub: what the previous one left waits for :meth:`redeliver`."""
        entry = self._domains.get(domain)
        if entry is None or entry.stub_url != component.url:
            entry = self._domains[domain] = _Domain(component.url)
        entry.leftovers.extend(entry.ledger)
        entry.ledger.clear()
        entry.posted = 0
        return TrackedComponent(component, entry)

    def redeliver(self, domain: str, component: Component | None) -> int:
        """The new instance is live: post it what the dead one left, in order; returns how many."""
        entry = self._domains.get(domain)
        if entry is None or not entry.leftovers or component is None:
            return 0
        leftovers, entry.leftovers = entry.leftovers, []
        count = 0
        for msg in leftovers:
            body = msg.body
            if body is not None and body.get("via") == entry.stub_url:
                del body["via"]  # stamped by the dead instance (in-process sandbox): not a loop
            if component.post(msg):
                count += 1
            else:
                self._answer(msg, 503, f"the stub for {domain} was restarted and refused this message")
        entry.counters["redelivered"] += count
        if count:
            _log.info("messages of a dead stub given to its successor", domain=domain, count=count)
        return count

    def abandon(self, domain: str, description: str) -> int:
        """No next instance will come: answer ``503`` now to every request the stub held or whose answer
        would have come back through it; returns how many."""
        entry = self._domains.get(domain)
        if entry is None:
            return 0
        waiting = [*entry.ledger, *entry.leftovers]
        entry.ledger.clear()
        entry.leftovers = []
        for msg in waiting:
            self._answer(msg, 503, description)
        # and the requests the stub did hand on, whose answers could only have come back through it
        answered = len(waiting) + self.bus.fail_route(entry.stub_url, 503, description)
        entry.counters["abandoned"] += answered
        return answered

    def save(self, domain: str, msg: Message) -> None:
        """``update`` to ``<stub url>/state`` from ``domain``'s stub: its saved state and hand-over count.

        Keyed by the domain the runtime deployed the stub for, never by anything in the message.
        """
        entry = self._domains.get(domain)
        if entry is None or msg.from_ != entry.stub_url or msg.type != "update":
            return  # only the stub itself saves its state
        body = msg.body or {}
        handed = body.get("handedOver")
        if type(handed) is int:
            entry.reports = True
            ledger = entry.ledger
            oldest = entry.posted - len(ledger) + 1  # the number of ledger[0]
            released = max(0, min(len(ledger), handed - oldest + 1))
            for _ in range(released):
                ledger.popleft()
            entry.counters["handed_over"] += released
        if "value" in body:
            state = body["value"]
            if len(msgspec.json.encode(state)) > MAX_STATE_BYTES:
                entry.counters["state_refused"] += 1
                _log.warning("saved stub state over the limit: refused", stub_url=entry.stub_url)
                return
            entry.state = state
            entry.counters["saved"] += 1

    def _answer(self, msg: Message, code: int, description: str) -> None:
        if msg.type == "response":
            return  # an answer is never answered
        try:
            self.bus.post(response(msg, code, description))
        except BusClosedError:
            pass
