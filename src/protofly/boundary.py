"""The trust boundary on the runtime's side: what a stub's message may do once it has crossed the channel.

A stub is code a remote domain wrote.  The sandbox's guard (:mod:`protofly.sandbox.guard`) already refused
messages whose ``from`` the stub may not use; here, with the registry's and the bus's knowledge, the
runtime decides the rest, one invariant in one place each (``docs/security.md`` lists them with their
counters):

* **destination** — a stub delivers only to local components that take outside traffic: a hyperty, a
  subscribed resource, or its own status resource.  Never to the runtime URL or anything under it (its
  status channel, the registry, the CLI, another stub or another stub's status), never to the sandbox's
  control addresses, and never onwards to another domain: a stub does not relay, so it cannot make the
  runtime deploy anything either.  Counted as ``forbidden_destination``; a request gets ``403``.
* **responses** — a response settles a waiting request only if it comes back through the stub the request
  went to, from the address it was sent to (:meth:`protofly.bus.MessageBus.settle_from`).  Otherwise it is
  dropped and counted as ``forged_responses``.
* **rates** — status updates and other messages each pass a token bucket per stub; the excess is dropped
  and counted (``status_rate_limited``, ``messages_rate_limited``), and a dropped request gets ``429``.
* **provenance** — every message let through carries ``body.via`` = the stub's URL, set here, so a
  receiver can tell a first-hand ``from`` from one relayed by the home stub.

Every drop is logged at most once per stub, kind and interval.

The destination rule is decided once per destination, not once per message: a destination found reachable
is kept in a small set that is emptied whenever a listener or a local component comes or goes (the bus's
``routes_version``, the registry's ``local_version``), so the answer is always the one the rule would
give now.  Refusals are never kept (they are rare, and each is counted anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protofly.address import is_within
from protofly.bus import NOT_PENDING, SETTLED, MessageBus
from protofly.log import get_logger
from protofly.message import Message
from protofly.registry import RuntimeRegistry, StubRecord
from protofly.throttle import LogThrottle, TokenBucket

__all__ = ["BoundaryPolicy", "StubBoundary"]

log = get_logger("protofly.boundary")

#: Types that are notifications (nobody waits for their answer): a refusal is counted, not answered, so a
#: flood of them does not turn into a flood of answers into the flooding stub's own channel.
_NOT_ANSWERED = frozenset({"response", "update"})

#: The sandbox control protocol's addresses: never a stub's destination.
_CONTROL_SPACE = "hyperty-runtime://sandbox"
#: Destinations per stub whose reachability is kept (all forgotten at once when full).
MAX_REACHABLE = 1024


@dataclass(frozen=True, slots=True)
class BoundaryPolicy:
    """Per-stub rates (from :class:`protofly.config.RuntimeConfig`)."""

    status_rate: float = 50.0
    status_burst: float = 100.0
    message_rate: float = 200_000.0
    message_burst: float = 50_000.0


class StubBoundary:
    """The checks for one stub's messages; :meth:`admit` says whether the runtime posts a message."""

    def __init__(
        self,
        record: StubRecord,
        *,
        bus: MessageBus,
        registry: RuntimeRegistry,
        policy: BoundaryPolicy,
        warnings: LogThrottle,
        clock: Callable[[], float],
    ) -> None:
        self.record = record
        self.url = record.url
        self._status_url = record.status_url
        self._bus = bus
        self._registry = registry
        self._runtime_url = registry.runtime_url
        self._statuses = TokenBucket(policy.status_rate, policy.status_burst, clock=clock)
        self._messages = TokenBucket(policy.message_rate, policy.message_burst, clock=clock)
        self._warnings = warnings
        #: Destinations this stub may reach, valid while the bus's and the registry's versions are these.
        self._reachable: set[str] = set()
        self._routes_seen = -1
        self._local_seen = -1

    def admit(self, msg: Message) -> bool:
        """True: post ``msg`` on the bus (``via`` stamped).  False: it was settled, dropped or answered here."""
        to = msg.to
        if to == self._status_url:
            if self._statuses.take():
                return True
            return self._refuse(msg, "status_rate_limited", 0, "status updates over the stub's rate")  # a notification
        if msg.type == "response":
            outcome = self._bus.settle_from(msg, self.url)
            if outcome == SETTLED:
                return False
            if outcome != NOT_PENDING:
                return self._refuse(
                    msg, "forged_responses", 0, "a response that did not come back the way its request went"
                )
        routes, local = self._bus.routes_version, self._registry.local_version
        if routes != self._routes_seen or local != self._local_seen:
            self._reachable.clear()
            self._routes_seen, self._local_seen = routes, local
        if to not in self._reachable:
            if not self._may_reach(to):
                return self._refuse(msg, "forbidden_destination", 403, f"a stub may not send to {to}")
            if len(self._reachable) >= MAX_REACHABLE:
                self._reachable.clear()
            self._reachable.add(to)
        if not self._messages.take():
            return self._refuse(msg, "messages_rate_limited", 429, "messages over the stub's rate")
        body = msg.body
        if body is None:
            msg.body = {"via": self.url}
        else:
            body["via"] = self.url
        return True

    def _may_reach(self, to: str) -> bool:
        if is_within(to, self._runtime_url) or is_within(to, _CONTROL_SPACE):
            return False
        if self._bus.has_listener(to):
            return True  # a hyperty or a subscribed resource
        # Nobody listens: the bus would answer 404 for a local address, but would relay anything else to
        # another stub (deploying it first), which a stub may never make the runtime do.  (Asked of the
        # registry's local table, not of route(): that would use up a response's return path.)
        return self._registry.is_local_component(to)

    def _refuse(self, msg: Message, counter: str, code: int, description: str) -> bool:
        total = self.record.count(counter)
        self._warnings.warning(
            (self.url, counter),
            "refused a message from a stub",
            stub_url=self.url,
            kind=counter,
            type=msg.type,
            to=msg.to[:200],
            sender=msg.from_[:200],
            total=total,
        )
        if code and msg.type not in _NOT_ANSWERED:
            self._bus.reply_error(msg, code, f"{description} ({counter})")
        return False
