"""The protocol stub SDK: what a stub author imports.

A stub is untrusted code from another domain.  It runs in a sandbox and sees exactly one thing of the
runtime: a :class:`Bus` (reTHINK's MiniBus) on which it posts messages and registers listeners.  Two ways
to write one, both following reTHINK's ``stub-specification``:

* extend :class:`ProtoStub` and override :meth:`~ProtoStub.connect`, :meth:`~ProtoStub.disconnect` and
  :meth:`~ProtoStub.on_message`; name the class in the descriptor's ``sourceCodeClassname`` (or define it as
  the module's only ``ProtoStub`` subclass);
* or export ``activate(url, bus, config)`` returning ``{"name": ..., "instance": ...}`` (the reTHINK module
  contract) and use ``bus.add_listener("*", callback)`` and ``bus.post(msg)`` directly.

The base class does the protocol chores every stub needs: the ``via`` loop check in both directions,
auto-connect on the first message, the ``created``/``in-progress``/``live``/``disconnected``/``failed``
status updates (``docs/architecture.md``, *Status*), and in-order delivery to an ``on_message`` that
may be sync or async.

This module is imported inside every sandbox, so it imports only asyncio and :mod:`protofly.message`
(msgspec): no structlog, no aiohttp.  It logs with stdlib :mod:`logging`; inside a sandbox those lines go to
stderr, which the runtime logs with the stub's URL bound.  Credentials passed to ``connect`` are never
logged here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from protofly.message import Message, MessageError, as_dict, from_dict

__all__ = [
    "AuthenticationFailed",
    "Bus",
    "Connector",
    "EgressError",
    "Message",
    "MessageError",
    "MethodNotFound",
    "ProtoStub",
    "as_dict",
    "call_public",
    "carries_via",
    "pong",
    "summary",
]

_log = logging.getLogger("protofly.stub")

Listener = Callable[[Message], Any]
#: What opens a stub's connections: the sandbox's broker, given the URL, returns a connected socket.
Connector = Callable[[str], Awaitable[socket.socket]]

#: Status values of the connection state group (``docs/architecture.md``, *Status*), emitted in lower case.
STATUS_VALUES = ("created", "in-progress", "live", "disconnected", "failed")


def summary(exc: BaseException) -> str:
    """``"ValueError: bad port"``: the one-line form used in error responses and status descriptions."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def carries_via(body: Mapping[str, Any] | None, url: str) -> bool:
    """True if ``body.via`` names ``url`` (a string compared for equality, or a list searched).

    reTHINK's model says ``via`` is a list, but its stubs write a single string; accept both.
    """
    if not body:
        return False
    via = body.get("via")
    if via is None:
        return False
    if isinstance(via, str):
        return via == url
    return isinstance(via, list) and url in via


class EgressError(ConnectionError):
    """The runtime did not open a connection the stub asked for; ``code`` is HTTP-style.

    ``403``: the URL is not in the stub's descriptor's ``egress``; ``400``: the URL is malformed; ``502``:
    the endpoint refused or cannot be resolved; ``504``: the connect timed out.  A ``ConnectionError``
    (an ``OSError``), so code that handles a failed connect handles this one too.
    """

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description

    def __str__(self) -> str:
        return self.description


class MethodNotFound(LookupError):
    """``execute`` named a method the stub does not offer (answered with ``404``)."""


class AuthenticationFailed(Exception):
    """Raised by a stub's ``connect`` when the back-end refused the credentials (answered with ``401``).

    The runtime keeps this apart from a transient failure: the stub is not retried against a server that
    said no, until new credentials are set (``Runtime.set_credentials``) and ``retry_now`` is called.
    """


class Bus:
    """The stub's view of the runtime bus: post messages, listen by address or on ``"*"``.

    Listeners registered for a message's ``to`` get it; when there are none, the ``"*"`` listeners do
    (reTHINK's MiniBus default listener).  A listener may be a coroutine function; its coroutine runs as a
    task the bus owns, so it is cancelled when the sandbox stops.
    """

    def __init__(
        self,
        send: Callable[[Message], None],
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
        connector: Connector | None = None,
    ) -> None:
        self._send = send
        self._on_fatal = on_fatal
        self._connector = connector
        self._listeners: dict[str, list[Listener]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_id = 0

    def post(self, msg: Message | Mapping[str, Any]) -> int | str:
        """Send ``msg`` to the runtime and return its id (one is assigned if it has none).

        A dict is validated first; bad input raises :class:`MessageError` naming the field.
        """
        if not isinstance(msg, Message):
            msg = from_dict(msg)
        if msg.id is None:
            self._next_id += 1
            msg.id = self._next_id
        self._send(msg)
        return msg.id

    post_message = post

    async def open_connection(self, url: str) -> socket.socket:
        """A connected, non-blocking TCP socket to ``url``, opened by the runtime (:meth:`ProtoStub.open_connection`).

        Raises :class:`EgressError` when the runtime refuses or cannot connect, and when this bus has no
        network at all (a bus made without a connector).
        """
        if self._connector is None:
            raise EgressError(403, f"egress: {url} refused: this stub has no network (no connection broker)")
        return await self._connector(url)

    def add_listener(self, url: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(msg)`` for messages to ``url`` (``"*"``: every message with no specific listener).

        Returns a function that removes the listener again.
        """
        if not isinstance(url, str) or not url:
            raise ValueError(f"listener address must be a non-empty string, got {url!r}")
        if not callable(listener):
            raise TypeError(f"listener for {url!r} must be callable, got {type(listener).__name__}")
        self._listeners.setdefault(url, []).append(listener)
        return lambda: self.remove_listener(url, listener)

    def remove_listener(self, url: str, listener: Listener) -> None:
        listeners = self._listeners.get(url)
        if listeners and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del self._listeners[url]

    def dispatch(self, msg: Message) -> None:
        """Hand a message from the runtime to the listeners (called by the sandbox, not by stubs).

        A listener's exception is logged and does not stop the others, except ``MemoryError``, which means
        the stub hit its memory limit and is propagated so that the sandbox can stop it.
        """
        listeners = self._listeners.get(msg.to) or self._listeners.get("*")
        if not listeners:
            _log.debug("no listener for message to %s", msg.to)
            return
        for listener in tuple(listeners):
            try:
                result = listener(msg)
            except MemoryError:
                raise
            except Exception:
                _log.exception("stub listener failed on a %s message to %s", msg.type, msg.to)
                continue
            if result is not None and inspect.isawaitable(result):
                self.spawn(result)

    def spawn(self, awaitable: Awaitable[Any], *, quiet: bool = False) -> asyncio.Task[Any]:
        """Run ``awaitable`` as a task the bus owns: kept alive, cancelled by :meth:`close`, errors logged.

        ``quiet`` is for tasks whose result someone awaits (that caller reports the error); a
        ``MemoryError`` is still reported as fatal.
        """
        # Its own owned set rather than protofly.tasks.TaskSet: this runs inside every sandbox host, which must
        # not import structlog (TaskSet's logger), and a MemoryError here is fatal for the stub, not a log line.
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._quiet_done if quiet else self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        exc = self._finished(task)
        if exc is not None:
            _log.error("stub task failed: %s", summary(exc), exc_info=exc)

    def _quiet_done(self, task: asyncio.Task[Any]) -> None:
        self._finished(task)

    def _finished(self, task: asyncio.Task[Any]) -> BaseException | None:
        """Forget the task; return its exception unless it was fatal (then the sandbox is told)."""
        self._tasks.discard(task)
        if task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, MemoryError) and self._on_fatal is not None:
            self._on_fatal(exc)
            return None
        return exc

    async def close(self) -> None:
        """Cancel every task the bus runs and wait (bounded) for them to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


class ProtoStub:
    """Base class of a protocol stub.

    ``url`` is the stub's runtime address (``hyperty-runtime://<domain>/<id>/protostub/<n>``), ``bus`` its
    only channel to the runtime, ``config`` the descriptor's ``configuration`` (plus ``runtimeURL``).
    Construction publishes ``created``.

    Override :meth:`connect` to open the transport to the back-end and :meth:`disconnect` to close it; the
    base class publishes ``in-progress`` before ``connect`` and ``live`` after it returns (``failed`` if it
    raises), and ``disconnected`` after ``disconnect`` returns, unless the method published a status itself.
    Override :meth:`on_message` to carry messages from the runtime to the back-end, and call
    :meth:`deliver` with messages from the back-end.
    """

    def __init__(self, url: str, bus: Bus, config: Mapping[str, Any] | None = None) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"stub url must be a non-empty string, got {url!r}")
        self.url = url
        self.status_url = f"{url}/status"
        self.bus = bus
        self.config: dict[str, Any] = dict(config or {})
        #: What the previous instance of this stub saved with :meth:`save_state` (None on a first deploy).
        self.saved_state: Any = self.config.pop("savedState", None)
        self.state = "created"
        #: reTHINK's keep-open flag is "not explicitly disconnected": messages reconnect until disconnect().
        self._disconnected_on_request = False
        self._status_count = 0
        self._backlog: deque[Message] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._connecting_with_credentials = False
        bus.add_listener("*", self._receive)
        self.status("created")

    # -- what a stub author overrides --------------------------------------------------------------

    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        """Open the connection to the back-end; ``credentials`` come from the runtime's identity module."""

    async def disconnect(self) -> None:
        """Close the connection to the back-end and stay disconnected until :meth:`connect` is called."""

    def on_message(self, msg: Message) -> Awaitable[None] | None:
        """A message the runtime routed to this stub (after the ``via`` check and the auto-connect)."""
        _log.debug("stub %s has no on_message; dropped a %s message", self.url, msg.type)
        return None

    # -- what a stub author calls -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == "live"

    def deliver(self, msg: Message | Mapping[str, Any]) -> bool:
        """Send a message from the back-end to the runtime, stamped with ``body.via = url``.

        A message that already carries this stub's ``via`` came from the runtime through this stub and is
        not sent back (loop prevention); the return value says whether the message was sent.
        """
        if not isinstance(msg, Message):
            msg = from_dict(msg)
        body = msg.body
        if body is None:
            msg.body = body = {}
        elif carries_via(body, self.url):
            return False
        body["via"] = self.url
        self.bus.post(msg)
        return True

    async def open_connection(self, url: str) -> socket.socket:
        """Open a TCP connection to ``url``, one of the endpoints the stub's descriptor declares (``egress``).

        A stub has no network of its own: the runtime opens the connection and hands over the connected,
        non-blocking socket, which works as it is with ``websockets.asyncio.client.connect(url, sock=sock)``
        and ``asyncio.open_connection(sock=sock)``.  For ``wss``, ``https`` and ``tls`` endpoints the
        stub speaks TLS itself: websockets does so for a ``wss://`` URL, and asyncio with
        ``ssl=ssl.create_default_context(), server_hostname=host``.  Raises :class:`EgressError` (a
        ``ConnectionError``) naming the reason when the URL is not declared, malformed or unreachable.
        """
        return await self.bus.open_connection(url)

    def save_state(self, state: Any, *, handed_over: int | None = None) -> None:
        """Leave ``state`` (JSON, at most 64 KiB) to the next instance of this stub, as :attr:`saved_state`.

        The runtime keeps the latest state per domain and hands it to the stub it deploys after a crash
        or an unload, so that a session with a back-end can outlive the process.  ``handed_over``: how
        many of the messages the runtime handed to this stub (counted from 1 in arrival order) are done
        with -- delivered for good or answered; after a crash the runtime gives the rest to the next
        instance again instead of letting their senders wait.
        """
        body: dict[str, Any] = {"value": state}
        if handed_over is not None:
            body["handedOver"] = handed_over
        self.bus.post(Message(type="update", from_=self.url, to=f"{self.url}/state", body=body))

    def status(self, value: str, description: str | None = None) -> None:
        """Publish a connection status: ``update`` from ``url`` to ``url/status`` with ``{value, description}``."""
        if not isinstance(value, str) or not value:
            raise ValueError(f"status value must be a non-empty string, got {value!r}")
        value = value.lower()
        body: dict[str, Any] = {"value": value}
        if description is not None:
            body["description"] = str(description)
        self.state = "live" if value == "connected" else value
        self._status_count += 1
        self.bus.post(Message(type="update", from_=self.url, to=self.status_url, body=body))

    # -- what the sandbox calls ---------------------------------------------------------------------

    async def handle_execute(self, method: str, params: list[Any]) -> Any:
        """Run an ``execute`` request from the runtime (``connect``, ``disconnect``, ``init``, ...)."""
        if method == "connect":
            credentials = params[0] if params else None
            self._disconnected_on_request = False
            await self._connect_once(credentials)
            return None
        if method == "disconnect":
            await self._disconnect_on_request()
            return None
        if method == "init" and not callable(getattr(self, "init", None)):
            return None
        return await call_public(self, method, params)

    async def _connect_once(self, credentials: Mapping[str, Any] | None) -> None:
        """Connect, sharing one attempt between the runtime's request and queued auto-connects.

        Credentials are never dropped: a request with credentials that finds an anonymous attempt (an
        auto-connect) running waits for it and then connects again with them.
        """
        running = self._connecting
        if running is not None and not running.done():
            if credentials is None or self._connecting_with_credentials:
                await asyncio.shield(running)
                return
            await asyncio.wait([running])
        self._connecting_with_credentials = credentials is not None
        self._connecting = self.bus.spawn(self._connect(credentials), quiet=True)
        await asyncio.shield(self._connecting)

    async def _connect(self, credentials: Mapping[str, Any] | None) -> None:
        before = self._status_count
        self.status("in-progress")
        before += 1
        try:
            await self.connect(credentials)
        except MemoryError:
            raise
        except Exception as exc:
            if self._status_count == before:
                self.status("failed", summary(exc))
            raise
        if self._status_count == before:
            self.status("live")

    async def _disconnect_on_request(self) -> None:
        self._disconnected_on_request = True
        before = self._status_count
        await self.disconnect()
        if self._status_count == before:
            self.status("disconnected")

    def needs_connect(self) -> bool:
        """Whether a message arriving now should make the SDK connect first (reTHINK's auto-connect).

        True while the stub is not live and nobody asked it to disconnect.  Override it in a stub that
        reconnects by itself and buffers meanwhile, so that the SDK does not start a second connection.
        """
        return self.state != "live" and not self._disconnected_on_request

    def _receive(self, msg: Message) -> None:
        """The ``"*"`` listener: via check, auto-connect, then ``on_message`` in arrival order."""
        if carries_via(msg.body, self.url):
            return
        if self._backlog is not None:
            self._backlog.append(msg)
            return
        if self.needs_connect():
            self._backlog = deque((msg,))
            self.bus.spawn(self._drain(None))
            return
        result = self.on_message(msg)
        if result is not None and inspect.isawaitable(result):
            self._backlog = deque()
            self.bus.spawn(self._drain(result))

    async def _drain(self, pending: Awaitable[None] | None) -> None:
        """Deliver the backlog in order, awaiting async handlers one by one (one auto-connect attempt)."""
        backlog = self._backlog
        tried_connect = False
        try:
            if pending is not None:
                await self._guarded(pending)
            while backlog:
                if not tried_connect and self.needs_connect():
                    tried_connect = True
                    await self._auto_connect()
                msg = backlog.popleft()
                try:
                    result = self.on_message(msg)
                except MemoryError:
                    raise
                except Exception:
                    _log.exception("stub %s: on_message failed on a %s message", self.url, msg.type)
                    continue
                if inspect.isawaitable(result):
                    await self._guarded(result)
        finally:
            self._backlog = None

    async def _auto_connect(self) -> None:
        try:
            await self._connect_once(None)
        except MemoryError:
            raise
        except Exception as exc:
            _log.warning("stub %s: auto-connect failed: %s", self.url, summary(exc))

    async def _guarded(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except MemoryError:
            raise
        except Exception:
            _log.exception("stub %s: on_message failed", self.url)


async def call_public(obj: object, method: str, params: list[Any]) -> Any:
    """Call ``obj.<method>(*params)`` for a public method name, awaiting the result if needed."""
    if not isinstance(method, str) or not method or method.startswith("_"):
        raise MethodNotFound(f"method name {method!r} is not a public method name")
    function = getattr(obj, method, None)
    if not callable(function):
        raise MethodNotFound(f"the stub has no method {method!r}")
    result = function(*params)
    if inspect.isawaitable(result):
        result = await result
    return result


def pong(stub: object | None) -> dict[str, Any]:
    """The SDK's answer to the runtime's liveness ping, given on the stub's event loop.

    A :class:`ProtoStub` reports its connection state: ``{"state": "live"}`` refreshes the stub's ``live``
    status on its behalf (its time to live, ``docs/operations.md``), so an SDK stub whose connection is
    healthy never expires.  A stub without the base class answers ``{}``: it proves its loop runs, and
    refreshes its status by publishing ``live`` again itself.
    """
    if isinstance(stub, ProtoStub):
        return {"state": stub.state}
    return {}
