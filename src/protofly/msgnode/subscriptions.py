"""The subscription table: which sessions receive what is published to a resource.

It owns the ``resource -> sessions`` index and keeps it in step with each session's own
``resource -> sources`` map (``Session.subscriptions``), whose pairs are capped by ``max_subscriptions``.
Matching is exact, as in reTHINK: no prefixes, no ``/changes`` magic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from protofly.address import AddressError, parse
from protofly.message import Message
from protofly.msgnode.actions import Refused
from protofly.msgnode.session import Session

__all__ = ["SubscriptionTable"]


class SubscriptionTable:
    """Subscribe and unsubscribe requests, and the subscribers of a resource (in subscription order)."""

    __slots__ = ("_subscribers", "max_subscriptions", "on_change")

    def __init__(self, max_subscriptions: int) -> None:
        self.max_subscriptions = max_subscriptions
        #: Told when a resource gets its first subscriber here (True) or loses its last (False): a
        #: clustered node subscribes to the resource's subject once per node, not once per session.
        self.on_change: Callable[[str, bool], None] | None = None
        #: resource -> its subscribed sessions (a dict as an insertion-ordered set).
        self._subscribers: dict[str, dict[Session, None]] = {}

    def subscribers(self, resource: str) -> dict[Session, None] | None:
        return self._subscribers.get(resource)

    def items(self) -> Iterator[tuple[str, dict[Session, None]]]:
        return iter(self._subscribers.items())

    def handle(self, session: Session, msg: Message) -> None:
        """Carry out a ``subscribe`` or ``unsubscribe`` (``msg.type`` says which)."""
        resources, source = self._request(msg)
        if msg.type == "subscribe":
            self._subscribe(session, resources, source or msg.from_)
        else:
            self._unsubscribe(session, resources, source)

    def _request(self, msg: Message) -> tuple[list[str], str | None]:
        """The resource list (``resources``, ``subscribe`` or ``unsubscribe``; merged) and ``source``."""
        body = msg.body or {}
        resources: list[str] = []
        seen_key = False
        for key in ("resources", msg.type):
            value = body.get(key)
            if value is None:
                continue
            seen_key = True
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise Refused(400, f"body.{key}: expected a list of resource addresses")
            for item in value:
                if not isinstance(item, str):
                    raise Refused(400, f"body.{key}: expected a list of resource addresses, found {item!r}")
                try:
                    parse(item)
                except AddressError as exc:
                    raise Refused(400, f"body.{key}: {exc}") from None
                resources.append(item)
        if not seen_key:
            raise Refused(
                400, f"body.resources: missing (the list of resources to {msg.type}; 'body.{msg.type}' is accepted too)"
            )
        source = body.get("source")
        if source is not None and (not isinstance(source, str) or not source):
            raise Refused(400, "body.source: expected a non-empty address")
        return resources, source

    def _subscribe(self, session: Session, resources: list[str], source: str) -> None:
        new = sum(1 for r in resources if source not in session.subscriptions.get(r, ()))
        if session.subscription_count + new > self.max_subscriptions:
            raise Refused(403, f"body.resources: this session may hold at most {self.max_subscriptions} subscriptions")
        for resource in resources:
            sources = session.subscriptions.setdefault(resource, set())
            if source not in sources:
                sources.add(source)
                session.subscription_count += 1
            self._add(resource, session)

    def _unsubscribe(self, session: Session, resources: list[str], source: str | None) -> None:
        """Without ``source`` the session stops receiving the resource; with it, only that source leaves."""
        for resource in resources:
            sources = session.subscriptions.get(resource)
            if sources is None:
                continue
            if source is None:
                session.subscription_count -= len(sources)
                sources.clear()
            elif source in sources:
                sources.discard(source)
                session.subscription_count -= 1
            if not sources:
                del session.subscriptions[resource]
                self._drop(resource, session)

    def release(self, session: Session) -> None:
        """An ending session leaves every resource it subscribed to."""
        for resource in session.subscriptions:
            self._drop(resource, session)
        session.subscriptions = {}
        session.subscription_count = 0

    def install(self, sessions: Iterable[Session]) -> None:
        """Index the subscriptions of restored sessions."""
        for session in sessions:
            for resource in session.subscriptions:
                self._add(resource, session)

    def _add(self, resource: str, session: Session) -> None:
        subscribers = self._subscribers.get(resource)
        if subscribers is None:
            subscribers = self._subscribers[resource] = {}
            if self.on_change is not None:
                self.on_change(resource, True)
        subscribers[session] = None

    def _drop(self, resource: str, session: Session) -> None:
        subscribers = self._subscribers.get(resource)
        if subscribers is not None:
            subscribers.pop(session, None)
            if not subscribers:
                del self._subscribers[resource]
                if self.on_change is not None:
                    self.on_change(resource, False)
