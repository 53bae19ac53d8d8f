"""The runtime's Message BUS: routes reTHINK messages by ``to``, correlates requests and responses.

Delivery to a listener is a plain synchronous call made inside :meth:`MessageBus.post`; an ``async``
handler is started as a task owned by the bus.  That keeps the hot path (a dict lookup and a call) cheap
and preserves the order in which one sender's messages reach a listener.

Nothing here is silent: a message nobody can take gets a ``404`` response, a rejected one an error
response from the interceptor's verdict, a request nobody answers a synthetic ``408``, a listener that
raises a ``500`` for its sender.  Responses never trigger error responses themselves, so two broken
peers cannot ping-pong errors forever; a response that cannot be delivered is counted and logged.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from protofly.log import get_logger
from protofly.message import Message, response, response_code
from protofly.tasks import TaskSet
from protofly.throttle import LogThrottle

__all__ = [
    "NOT_PENDING",
    "REFUSED",
    "SETTLED",
    "BusClosedError",
    "Handler",
    "Interceptor",
    "Listener",
    "MessageBus",
    "Rejected",
    "Resolver",
]

log = get_logger("protofly.bus")

#: A listener: called with each message whose ``to`` is its address; may return an awaitable.
Handler = Callable[[Message], Any]
#: An interceptor: returns the message to pass on (the same one, or a rewritten one) or raises ``Rejected``.
Interceptor = Callable[[Message], Message]
#: The unknown-destination hook: the address to deliver to instead (a stub URL), or None for "nobody".
Resolver = Callable[[Message], "str | Awaitable[str | None] | None"]

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_RESOLVE_TIMEOUT = 30.0
#: Request deadlines are grouped in slots of this many seconds, one loop timer per slot: a timer per
#: request cost a third of a round trip.  A 408 may therefore come up to one slot late.
TIMER_SLOT = 0.005


class Rejected(Exception):
    """Raised by an interceptor to refuse a message; the sender gets ``code`` and ``description``."""

    def __init__(self, code: int = 403, description: str = "rejected by policy") -> None:
        super().__init__(f"{code} {description}")
        self.code = code
        self.description = description


class BusClosedError(RuntimeError):
    """The bus was closed; nothing more is accepted."""


@dataclass(eq=False, slots=True)
class Listener:
    """Handle returned by :meth:`MessageBus.add_listener`; ``remove()`` is idempotent."""

    bus: MessageBus
    address: str
    handler: Handler

    def remove(self) -> None:
        self.bus._remove_listener(self)


#: What :meth:`MessageBus.settle_from` found for a response that came through a stub.
NOT_PENDING, SETTLED, REFUSED = 0, 1, 2


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Message]
    request: Message
    timeout: float
    slot: int = 0
    on_provisional: Callable[[Message], None] | None = None
    #: Where the request was delivered (the stub URL or local listener): only an answer coming back
    #: from there may settle it.
    route: str | None = None


@dataclass
class BusStats:
    """Counters a runtime exposes; each names a way a message ended."""

    delivered: int = 0
    unroutable: int = 0
    rejected: int = 0
    handler_errors: int = 0
    timeouts: int = 0
    dropped_responses: int = 0
    #: error responses not sent because the bus was already closed
    dropped_after_close: int = 0
    loops: int = 0
    by_code: dict[int, int] = field(default_factory=dict)


class MessageBus:
    """Exact-address routing with request/response correlation, interceptors and a resolver hook."""

    def __init__(
        self,
        *,
        resolver: Resolver | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> None:
        self._routes: dict[str, tuple[Listener, ...]] = {}
        #: Bumped whenever a listener is added or removed: a cache of answers to :meth:`has_listener`
        #: (the trust boundary's) is valid only while it stays the same.
        self.routes_version = 0
        self._interceptors: tuple[Interceptor, ...] = ()
        self._pending: dict[tuple[str, int | str | None], _Pending] = {}
        self._slots: dict[int, tuple[asyncio.TimerHandle, set[tuple[str, int | str | None]]]] = {}
        self._next_id: dict[str, int] = {}
        self._tasks = TaskSet("bus")
        self._warnings = LogThrottle(log)
        self._resolver = resolver
        self._closed = False
        self.request_timeout = request_timeout
        self.resolve_timeout = resolve_timeout
        self.stats = BusStats()

    # -- listeners and hooks ---------------------------------------------------------------------

    def add_listener(self, address: str, handler: Handler) -> Listener:
        """Deliver every message whose ``to`` equals ``address`` to ``handler`` (sync or async)."""
        if not isinstance(address, str) or not address:
            raise ValueError("listener address must be a non-empty string")
        listener = Listener(self, address, handler)
        self._routes[address] = (*self._routes.get(address, ()), listener)
        self.routes_version += 1
        return listener

    def _remove_listener(self, listener: Listener) -> None:
        current = self._routes.get(listener.address, ())
        self.routes_version += 1
        remaining = tuple(entry for entry in current if entry is not listener)
        if remaining:
            self._routes[listener.address] = remaining
        else:
            self._routes.pop(listener.address, None)

    def has_listener(self, address: str) -> bool:
        return address in self._routes

    def add_interceptor(self, interceptor: Interceptor) -> Callable[[], None]:
        """Append ``interceptor`` to the pipeline every message passes; returns a function that removes it."""
        self._interceptors = (*self._interceptors, interceptor)

        def remove() -> None:
            self._interceptors = tuple(i for i in self._interceptors if i is not interceptor)

        return remove

    def set_resolver(self, resolver: Resolver | None) -> None:
        """Install the hook asked where a message with no listener should go (the registry's ``resolve``)."""
        self._resolver = resolver

    # -- sending ---------------------------------------------------------------------------------

    def post(self, msg: Message) -> None:
        """Route ``msg`` now (fire and forget): listeners are called before this returns."""
        if self._closed:
            raise BusClosedError("the message bus is closed")
        if self._interceptors:
            passed = self._intercept(msg)
            if passed is None:
                return
            msg = passed
        if msg.type == "response" and self._pending and self._settle(msg):
            return
        listeners = self._routes.get(msg.to)
        if listeners is not None:
            if self._pending and msg.type != "response":
                self._note_route(msg, msg.to)
            self._deliver(listeners, msg)
        else:
            self._route_unknown(msg)

    def publish(self, msg: Message) -> int:
        """Deliver an event to whoever listens on ``to`` now; nobody listening is normal, not an error.

        Status re-publication uses this: a ``404`` for an event with no subscriber would only be noise.
        """
        listeners = self._routes.get(msg.to)
        if listeners is None:
            return 0
        self._deliver(listeners, msg)
        return len(listeners)

    async def request(
        self,
        msg: Message,
        timeout: float | None = None,
        *,
        on_provisional: Callable[[Message], None] | None = None,
    ) -> Message:
        """Post ``msg`` and wait for its response; a synthetic ``408`` response when none comes in time.

        The id is allocated per sender when missing (or 0), so two senders may use the same ids freely:
        correlation is on the pair ``(from, id)``.  ``1xx`` responses go to ``on_provisional`` and the
        wait goes on, with the timer restarted (the peer is alive and working).
        """
        if self._closed:
            raise BusClosedError("the message bus is closed")
        if msg.id is None or msg.id == 0:
            msg.id = self.allocate_id(msg.from_)
        key = (msg.from_, msg.id)
        if key in self._pending:
            raise ValueError(f"id: a request from {msg.from_} with id {msg.id!r} is already waiting")
        loop = asyncio.get_running_loop()
        wait = self.request_timeout if timeout is None else timeout
        pending = _Pending(loop.create_future(), msg, wait, 0, on_provisional)
        pending.slot = self._arm(loop, key, wait)
        self._pending[key] = pending
        try:
            self.post(msg)
            return await pending.future
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
            self._disarm(key, pending.slot)

    def allocate_id(self, sender: str) -> int:
        """Next request id for ``sender`` (ids need only be unique per sender)."""
        value = self._next_id.get(sender, 0) + 1
        self._next_id[sender] = value
        return value

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    # -- internals -------------------------------------------------------------------------------

    def _deliver(self, listeners: tuple[Listener, ...], msg: Message) -> None:
        for listener in listeners:
            try:
                result = listener.handler(msg)
            except Exception as exc:
                self._handler_failed(listener, msg, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                self._spawn(self._await_handler(listener, msg, result))
        self.stats.delivered += 1

    async def _await_handler(self, listener: Listener, msg: Message, result: Awaitable[Any]) -> None:
        try:
            await result
        except Exception as exc:
            self._handler_failed(listener, msg, exc)

    def _handler_failed(self, listener: Listener, msg: Message, exc: Exception) -> None:
        self.stats.handler_errors += 1
        log.error(
            "listener raised",
            address=listener.address,
            type=msg.type,
            sender=msg.from_,
            id=msg.id,
            exc_info=exc,
        )
        self.reply_error(msg, 500, f"listener at {listener.address} failed ({type(exc).__name__})")

    def _intercept(self, msg: Message) -> Message | None:
        for interceptor in self._interceptors:
            try:
                msg = interceptor(msg)
            except Rejected as verdict:
                self.stats.rejected += 1
                self.reply_error(msg, verdict.code, verdict.description)
                return None
            except Exception as exc:
                self.stats.rejected += 1
                log.error("interceptor raised", interceptor=repr(interceptor), exc_info=exc)
                self.reply_error(msg, 500, f"interceptor failed ({type(exc).__name__})")
                return None
        return msg

    def _note_route(self, msg: Message, target: str) -> None:
        """Remember where a waited-for request went, for :meth:`settle_from` (its first route only)."""
        pending = self._pending.get((msg.from_, msg.id))
        if pending is not None and pending.route is None:
            pending.route = target

    def _find_pending(self, msg: Message) -> _Pending | None:
        pending = self._pending.get((msg.to, msg.id))
        if pending is None:
            pending = self._pending.get((msg.to, _other_id_form(msg.id)))
        return pending

    def settle_from(self, msg: Message, origin: str) -> int:
        """A response that came through the stub at ``origin``: settle its request only if it went there.

        The answer must come back the way its request went (``origin`` is where the bus delivered the
        request) and from the address the request was sent to (or another address of the same node
        component host), so a guessed id gains a stub nothing.  Returns :data:`SETTLED`,
        :data:`REFUSED` (a request waits under that key but this is not its answer: the caller drops and
        counts it) or :data:`NOT_PENDING` (nobody waits: route it as any message).
        """
        pending = self._find_pending(msg) if self._pending else None
        if pending is None:
            return NOT_PENDING
        if pending.route != origin or not _answers_for(msg.from_, pending.request.to):
            return REFUSED
        self._settle_pending(pending, msg)
        return SETTLED

    def fail_route(self, route: str, code: int, description: str) -> int:
        """Answer now every request waiting for an answer only ``route`` could bring (a stub gone for good).

        Returns how many; used when a stub's process died and no instance will come back for its session,
        so that no sender waits for its request timeout.
        """
        failed = [p for p in self._pending.values() if p.route == route and not p.future.done()]
        for pending in failed:
            self._settle_pending(pending, response(pending.request, code, description))
        return len(failed)

    def _settle(self, msg: Message) -> bool:
        """Hand a response to the request waiting for it; False if nobody waits (route it normally)."""
        pending = self._find_pending(msg)
        if pending is None:
            return False
        self._settle_pending(pending, msg)
        return True

    def _settle_pending(self, pending: _Pending, msg: Message) -> None:
        code = response_code(msg)
        if code is not None and code < 200:
            if pending.on_provisional is not None:
                try:
                    pending.on_provisional(msg)
                except Exception as exc:
                    log.error("provisional-response callback raised", exc_info=exc)
            key = (pending.request.from_, pending.request.id)
            self._disarm(key, pending.slot)
            pending.slot = self._arm(asyncio.get_running_loop(), key, pending.timeout)
            return
        if not pending.future.done():
            pending.future.set_result(msg)

    def _arm(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int | str | None], timeout: float) -> int:
        slot = int((loop.time() + timeout) / TIMER_SLOT) + 1
        entry = self._slots.get(slot)
        if entry is None:
            self._slots[slot] = (loop.call_at(slot * TIMER_SLOT, self._expire_slot, slot), {key})
        else:
            entry[1].add(key)
        return slot

    def _disarm(self, key: tuple[str, int | str | None], slot: int) -> None:
        entry = self._slots.get(slot)
        if entry is not None:
            entry[1].discard(key)

    def _expire_slot(self, slot: int) -> None:
        _, keys = self._slots.pop(slot, (None, set()))
        for key in keys:
            pending = self._pending.pop(key, None)
            if pending is None or pending.future.done():
                continue
            self.stats.timeouts += 1
            request = pending.request
            description = f"no response from {request.to} within {pending.timeout:g} s"
            pending.future.set_result(response(request, 408, description))

    def _route_unknown(self, msg: Message) -> None:
        resolver = self._resolver
        try:
            target = resolver(msg) if resolver is not None else None
        except Rejected as verdict:  # the resolver knows why there is no route (e.g. a bound was reached)
            self.stats.unroutable += 1
            self.reply_error(msg, verdict.code, verdict.description)
            return
        if target is None or isinstance(target, str):
            self._deliver_resolved(msg, target)
        else:
            self._spawn(self._await_resolution(msg, target))

    async def _await_resolution(self, msg: Message, pending: Awaitable[str | None]) -> None:
        try:
            async with asyncio.timeout(self.resolve_timeout):
                target = await pending
        except TimeoutError:
            self.reply_error(msg, 504, f"no route to {msg.to} within {self.resolve_timeout:g} s")
            return
        except Exception as exc:
            log.warning("resolver failed", to=msg.to, error=str(exc))
            self.reply_error(msg, 503, f"no route to {msg.to}: {exc}")
            return
        if not self._closed:
            self._deliver_resolved(msg, target)

    def _deliver_resolved(self, msg: Message, target: str | None) -> None:
        listeners = self._routes.get(target) if target is not None else None
        if listeners is None or target is None:
            self.stats.unroutable += 1
            self.reply_error(msg, 404, f"no route to {msg.to}")
            return
        body = msg.body
        if body is not None and body.get("via") == target:
            # The message came out of this very stub: sending it back in would start a loop.
            self.stats.loops += 1
            self.reply_error(msg, 508, f"loop: message to {msg.to} came from {target}")
            return
        if self._pending and msg.type != "response":
            self._note_route(msg, target)
        self._deliver(listeners, msg)

    def reply_error(self, msg: Message, code: int, description: str) -> None:
        """Answer ``msg``'s sender with an error response; a response, or anything once closed, is only counted.

        The one place where "never silence" and "never answer a response" meet, for the bus and its users.
        """
        self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        if msg.type == "response":
            self.stats.dropped_responses += 1
            self._warnings.warning(
                ("dropped response",), "undeliverable response dropped", to=msg.to, sender=msg.from_, code=code,
                reason=description, dropped_responses=self.stats.dropped_responses,
            )  # fmt: skip
            return
        if self._closed:
            self.stats.dropped_after_close += 1
            log.info(
                "bus closed: error response not sent",
                type=msg.type,
                id=msg.id,
                to=msg.to,
                sender=msg.from_,
                code=code,
                reason=description,
            )
            return
        self.post(response(msg, code, description))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()  # an async listener reached after close: nothing more runs
            return
        self._tasks.spawn(coro)

    # -- shutdown --------------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new messages, answer every waiting request with ``503``, cancel the bus's own tasks."""
        if self._closed:
            return
        self._closed = True
        for handle, _ in self._slots.values():
            handle.cancel()
        self._slots.clear()
        for key, pending in list(self._pending.items()):
            self._pending.pop(key, None)
            if not pending.future.done():
                pending.future.set_result(response(pending.request, 503, "message bus closed"))
        await self._tasks.close(timeout)


def _answers_for(sender: str, asked: str) -> bool:
    """True if a response from ``sender`` may answer a request sent to ``asked``.

    The same address, or two addresses on one ``domain://`` component host (a node answers requests to
    ``domain://msg-node.<d>/x`` from another of its component addresses).
    """
    if sender == asked:
        return True
    if sender.startswith("domain://") and asked.startswith("domain://"):
        return sender.split("/", 3)[2] == asked.split("/", 3)[2]
    return False


def _other_id_form(value: int | str | None) -> int | str | None:
    """Peers re-encode ids (Vert.x turns ``"1"`` into ``1``); match either form on a miss."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
