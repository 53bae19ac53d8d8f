"""The message node's protocol, without any I/O: sessions, allocations, subscriptions and routing.

:class:`MessageNodeCore` is a plain object.  The shell (``server.py``) tells it what happened on the
network (``connected``, ``received``, ``received_binary``, ``disconnected``) and what time it is
(``tick``); every call returns the list of things the shell must now do (:class:`Send`,
:class:`Close`, :class:`EnableBatch`, :class:`SessionEnded`).  The core never reads a clock and never
touches a socket, so every protocol rule is unit-tested with plain function calls.

Connections are opaque hashable objects chosen by the shell; the core only uses them as keys and hands
them back in actions.

Routing precedence for a message's ``to``:

1. a node component (``mn:/session``, the three allocation endpoints, ``.../sm``, the registries);
2. an address allocated to, or bound on the fly to, a session (exact match);
3. a session's runtime URL or anything below it (``<runtimeURL>/sm``, ``<runtimeURL>/<token>``);
4. the sessions subscribed to exactly that resource (no prefix or ``/changes`` matching, as reTHINK);
5. otherwise ``404`` to the sender -- except that a ``response`` is never answered (that could loop):
   it is counted and dropped.

Point-to-point messages are forwarded as the exact bytes received; a fan-out encodes once and hands the
same bytes object to every subscriber.

Lossless graceful restart (``docs/msgnode.md``):

* **buffering** -- a message for a *detached* session (socket gone, waiting for ``re-open``) is kept, as
  the raw frame, in a bounded per-session buffer and handed back (:class:`Replay`) right after the
  session's next successful ``re-open``; a full buffer is a ``503`` to the sender, an expired (or
  replaced) session answers each buffered point-to-point request with ``410``;
* **drain extension** -- a connection that asked ``"drain": true`` at ``open``/``re-open`` is told
  ``draining`` by :meth:`MessageNodeCore.begin_drain` and answers ``drained`` as its last frame
  (:class:`Drained` reports it); :meth:`~MessageNodeCore.close_plain` and
  :meth:`~MessageNodeCore.finish_drain` close the rest, detaching their sessions first so nothing routed
  to them afterwards is written to a closing socket;
* **state** -- :meth:`~MessageNodeCore.snapshot` exports sessions, allocations, bindings, subscriptions
  and buffers as plain JSON-able data; :meth:`~MessageNodeCore.restore` loads it into an empty core, every
  session detached with a fresh grace period.  The shell does the file I/O.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import hmac
import itertools
import re
import uuid
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protofly.address import AddressError, parse, validate_domain
from protofly.message import Message, MessageError, decode, encode, response

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_SESSION_TAKEN_OVER",
    "CLOSE_TOO_BIG",
    "CLOSE_TRY_AGAIN_LATER",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_BUFFER_MESSAGES",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_SEND_QUEUE",
    "DEFAULT_SEND_QUEUE_BYTES",
    "SESSION_URL",
    "STATE_FORMAT",
    "STATE_VERSION",
    "Action",
    "Close",
    "Drained",
    "EnableBatch",
    "MessageNodeCore",
    "Replay",
    "Send",
    "Session",
    "SessionEnded",
    "StateError",
]

#: The session manager component of every node (Vert.x ``SessionManager``).
SESSION_URL = "mn:/session"

#: Largest frame accepted (and produced when packing a batch), 1 MiB unless configured.
DEFAULT_MAX_FRAME = 1 << 20
#: Messages and bytes that may wait for one slow connection before the shell disconnects it.
DEFAULT_SEND_QUEUE = 10_000
DEFAULT_SEND_QUEUE_BYTES = 8 << 20
#: Messages and bytes kept for one detached session until its re-open (beyond: ``503`` to the sender).
DEFAULT_BUFFER_MESSAGES = 10_000
DEFAULT_BUFFER_BYTES = 8 << 20

#: ``format`` and ``version`` of :meth:`MessageNodeCore.snapshot`; :meth:`~MessageNodeCore.restore`
#: refuses anything else (a newer version would be misread, an older format does not exist).
STATE_FORMAT = "protofly-msgnode-state"
STATE_VERSION = 1

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
#: Application range: the session was re-opened from another connection, which now owns it.
CLOSE_SESSION_TAKEN_OVER = 4000

_SESSION_TYPES = frozenset({"open", "re-open", "close"})
_SHUTDOWN_REASON = "message node shutting down"
_ENDED = {"expired": "expired", "replaced": "was replaced by a new open", "closed": "was closed"}
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,31}\Z")
#: Schemes a session may not allocate: they name runtimes and node/domain infrastructure.
_RESERVED_SCHEMES = frozenset({"hyperty-runtime", "runtime", "domain", "global", "mn", "user", "user-guid"})
_WHITESPACE = b" \t\r\n"
_CLOSE_REASON_MAX = 120  # RFC 6455 allows 123 bytes of reason; keep a margin


# -- state snapshot (the JSON-able form of everything a restart must keep) --------------------------


class _BufferedState(msgspec.Struct, omit_defaults=True):
    """One buffered frame: its text, or (a peer sent bytes that are not UTF-8) their base64."""

    data: str | None = None
    base64: str | None = None


class _SessionState(msgspec.Struct, omit_defaults=True, rename={"runtime_url": "runtimeURL"}):
    runtime_url: str
    token: str
    flags: dict[str, bool] = {}
    addresses: list[str] = []
    #: allocationKey -> the addresses of that block
    keys: dict[str, list[str]] = {}
    #: foreign hyperties bound on the fly, least recently used first
    bound: list[str] = []
    #: resource -> the sources subscribed to it
    subscriptions: dict[str, list[str]] = {}
    buffer: list[_BufferedState] = []


class _State(msgspec.Struct):
    format: str
    version: int
    domain: str
    sessions: list[_SessionState]


# -- actions ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Write ``data`` (one encoded JSON message) to ``conn``; the shell frames (or packs) it."""

    conn: Hashable
    data: bytes | memoryview | msgspec.Raw


@dataclass(slots=True)
class Close:
    """Flush what is queued for ``conn``, then close it with a WebSocket close code."""

    conn: Hashable
    code: int
    reason: str


@dataclass(slots=True)
class EnableBatch:
    """From now on ``conn`` may receive several messages packed into one JSON-array frame.

    Emitted after the ``200`` that grants it, so the grant itself always travels as a plain frame.
    """

    conn: Hashable
    max_frame: int


@dataclass(slots=True)
class SessionEnded:
    """A session is gone (``closed``, ``expired`` or ``replaced``) and its addresses are free."""

    url: str
    runtime_url: str
    reason: str
    addresses: int


@dataclass(slots=True)
class Replay:
    """Write ``frames`` (a re-opened session's buffered messages, in order) to ``conn`` after its ``200``.

    One action for the whole buffer, so the shell can queue it beyond its usual per-connection limit:
    these messages were already accepted, and cutting the reader off as a slow consumer would lose them.
    """

    conn: Hashable
    frames: list[bytes]


@dataclass(slots=True)
class Drained:
    """``conn`` said ``drained`` (or went away) during a drain; ``remaining`` drain connections to wait for."""

    conn: Hashable
    remaining: int


Action = Send | Close | EnableBatch | SessionEnded | Replay | Drained


class StateError(ValueError):
    """A state snapshot that cannot be loaded; the text names the offending field."""


# -- state -----------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Session:
    """One runtime's session: what it owns on this node and where its connection is (if any)."""

    runtime_url: str
    token: str
    url: str
    conn: Hashable | None = None
    #: When a detached session expires (``None`` while a connection is bound).
    deadline: float | None = None
    #: Addresses allocated by this session.
    addresses: set[str] = field(default_factory=set)
    #: allocationKey -> the addresses allocated under it.
    keys: dict[str, list[str]] = field(default_factory=dict)
    #: Foreign hyperty addresses bound on the fly; dict order is least recently used first.
    bound: dict[str, None] = field(default_factory=dict)
    #: resource -> the ``source`` values (who, inside the runtime) subscribed to it.
    subscriptions: dict[str, set[str]] = field(default_factory=dict)
    subscription_count: int = 0
    #: Extensions the last connection negotiated (kept in the state file for operators; a re-open
    #: negotiates afresh).
    drain: bool = False
    batch: bool = False
    #: Messages routed here while detached (the raw frames), oldest first.
    buffer: list[bytes] = field(default_factory=list)
    buffer_bytes: int = 0


@dataclass(eq=False, slots=True)
class _Conn:
    conn: Hashable
    session: Session | None = None
    batch: bool = False
    #: The drain extension was granted on this connection.
    drain: bool = False
    #: A Close was issued: frames still arriving before the socket goes are ignored (and counted).
    closing: bool = False


_COUNTERS = (
    "connections",
    "messages_in",
    "delivered",
    "fanout_deliveries",
    "invalid",
    "errors_sent",
    "not_found",
    "responses_dropped",
    "buffered",
    "buffer_full",
    "replayed",
    "buffer_answered",
    "buffer_discarded",
    "sessions_opened",
    "sessions_reopened",
    "sessions_closed",
    "sessions_expired",
    "sessions_replaced",
    "addresses_allocated",
    "addresses_freed",
    "bound",
    "bound_evicted",
    "ignored_after_close",
    "drain_notices",
    "drained",
    "drain_timeouts",
    "sessions_restored",
)


class MessageNodeCore:
    """Sessions, allocations, subscriptions and routing of one domain's message node.

    Limits (all per session) keep one misbehaving runtime from exhausting the node's memory:
    ``max_addresses`` allocated addresses, ``max_block`` addresses per allocation request,
    ``max_bound`` foreign hyperties bound on the fly (least recently used evicted first) and
    ``max_subscriptions`` (resource, source) subscription pairs; a detached session keeps at most
    ``buffer_messages`` messages and ``buffer_bytes`` bytes for its re-open.
    """

    def __init__(
        self,
        domain: str,
        *,
        session_grace: float = 30.0,
        auth_tokens: Collection[str] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_addresses: int = 10_000,
        max_block: int = 1_000,
        max_bound: int = 1_000,
        max_subscriptions: int = 10_000,
        buffer_messages: int = DEFAULT_BUFFER_MESSAGES,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.domain = validate_domain(domain)
        self.session_grace = session_grace
        self.max_frame = max_frame
        self.max_addresses = max_addresses
        self.max_block = max_block
        self.max_bound = max_bound
        self.max_subscriptions = max_subscriptions
        self.buffer_messages = buffer_messages
        self.buffer_bytes = buffer_bytes
        self._auth = None if auth_tokens is None else tuple(t.encode() for t in auth_tokens)
        self._new_id = new_id
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

        node = f"domain://msg-node.{self.domain}"
        self.allocation_url = f"{node}/address-allocation"
        self.hyperty_allocation_url = f"{node}/hyperty-address-allocation"
        self.object_allocation_url = f"{node}/object-address-allocation"
        self.subscription_url = f"{node}/sm"
        self.registry_url = f"domain://registry.{self.domain}"
        self._node_prefix = node + "/"
        self._registry_prefixes = (self.registry_url + "/", "global://registry/")

        self._conns: dict[Hashable, _Conn] = {}
        self._sessions: dict[str, Session] = {}
        self._by_runtime: dict[str, Session] = {}
        self._owner: dict[str, Session] = {}
        self._subscribers: dict[str, dict[Session, None]] = {}
        self._deadlines: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        #: Set by begin_drain; the drain connections that have not said ``drained`` yet.
        self._draining = False
        self._awaiting: set[Hashable] = set()
        self._notice_ids = itertools.count(1)
        self._components: dict[str, Callable[[_Conn, Message, list[Action]], None]] = {
            SESSION_URL: self._session_component,
            self.allocation_url: self._allocation_component,
            self.hyperty_allocation_url: self._allocation_component,
            self.object_allocation_url: self._allocation_component,
            self.subscription_url: self._subscription_component,
            self.registry_url: self._registry_component,
            self.registry_url + "/": self._registry_component,
            "global://registry": self._registry_component,
            "global://registry/": self._registry_component,
        }

    # -- introspection (tests, stats) --------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        return self._auth is not None

    def session(self, url: str) -> Session | None:
        """The live or detached session at ``<runtimeURL>/<token>``."""
        return self._sessions.get(url)

    def session_of(self, conn: Hashable) -> Session | None:
        state = self._conns.get(conn)
        return None if state is None else state.session

    def owner(self, address: str) -> Session | None:
        """The session an allocated or bound address routes to."""
        return self._owner.get(address)

    def subscribers(self, resource: str) -> list[Session]:
        return list(self._subscribers.get(resource, ()))

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def address_count(self) -> int:
        return len(self._owner)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def drain_pending(self) -> int:
        """Drain connections that have neither said ``drained`` nor gone away yet."""
        return len(self._awaiting)

    def plain_connections(self) -> int:
        """Open connections that did not negotiate the drain extension (closed after the short grace)."""
        return sum(1 for state in self._conns.values() if not state.drain and not state.closing)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work to do (a detached session expiring), or None."""
        heap = self._deadlines
        while heap:
            when, _, session = heap[0]
            if session.deadline == when and session.conn is None and session.url in self._sessions:
                return when
            heapq.heappop(heap)
        return None

    # -- events ------------------------------------------------------------------------------------

    def connected(self, conn: Hashable) -> list[Action]:
        self._conns[conn] = _Conn(conn)
        self.counters["connections"] += 1
        return []

    def received(self, conn: Hashable, data: bytes | bytearray | memoryview | str | Message) -> list[Action]:
        """One text frame (or an already-decoded message) arrived on ``conn``."""
        state = self._conns.get(conn)
        if state is None:
            state = self._conns[conn] = _Conn(conn)
        elif state.closing:
            self.counters["ignored_after_close"] += 1
            return []
        out: list[Action] = []
        counters = self.counters
        if type(data) is not bytes:
            if isinstance(data, Message):
                counters["messages_in"] += 1
                self._route(state, data, None, out)
                return out
            data = data.encode() if isinstance(data, str) else bytes(data)
        if len(data) > self.max_frame:
            counters["invalid"] += 1
            text = f"frame of {len(data)} bytes is over the {self.max_frame}-byte limit"
            self._close_conn(state, CLOSE_TOO_BIG, text, out)
            return out
        if not state.batch or not _starts_array(data):  # the common case: one message per frame
            counters["messages_in"] += 1
            try:
                msg = decode(data, max_size=self.max_frame)
            except MessageError as exc:
                self._invalid(state, data, str(exc), out)
                return out
            self._route(state, msg, data, out)
            return out
        try:
            items: list[msgspec.Raw] = msgspec.json.decode(data, type=list[msgspec.Raw])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            counters["invalid"] += 1
            self._close_conn(state, CLOSE_INVALID_PAYLOAD, f"batch: not a JSON array ({exc})", out)
            return out
        for raw in items:
            if state.closing:  # an element of this batch already condemned the connection
                break
            counters["messages_in"] += 1
            try:
                msg = decode(raw, max_size=self.max_frame)
            except MessageError as exc:
                self._invalid(state, raw, str(exc), out)
                continue
            self._route(state, msg, raw, out)
        return out

    def received_binary(self, conn: Hashable) -> list[Action]:
        """reTHINK carries JSON in text frames only; a binary frame means a confused peer."""
        state = self._conns.get(conn)
        if state is None:
            state = self._conns[conn] = _Conn(conn)
        elif state.closing:
            self.counters["ignored_after_close"] += 1
            return []
        self.counters["invalid"] += 1
        out: list[Action] = []
        self._close_conn(state, CLOSE_UNSUPPORTED_DATA, "binary frames are not supported: send JSON text frames", out)
        return out

    def disconnected(self, conn: Hashable, now: float) -> list[Action]:
        """The socket is gone: its session (if any) waits ``session_grace`` seconds for a re-open."""
        state = self._conns.pop(conn, None)
        out: list[Action] = []
        if conn in self._awaiting:  # everything it sent before going was routed: as good as 'drained'
            self._awaiting.discard(conn)
            out.append(Drained(conn, len(self._awaiting)))
        if state is None or state.session is None or state.session.conn is not conn:
            return out
        self._detach(state.session, now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Expire the detached sessions whose grace period is over, freeing their addresses."""
        out: list[Action] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            when, _, session = heapq.heappop(heap)
            if session.deadline == when and session.conn is None and session.url in self._sessions:
                self._end(session, "expired", out)
        return out

    # -- graceful stop (drain extension) --------------------------------------------------------------

    def begin_drain(self) -> list[Action]:
        """The node is stopping: tell every drain connection ``draining``; routing goes on as usual.

        A connection that negotiates drain later (an ``open`` arriving during the drain) is told at once.
        """
        out: list[Action] = []
        if self._draining:
            return out
        self._draining = True
        for state in self._conns.values():
            if state.drain and state.session is not None and not state.closing:
                self._notify_draining(state, out)
        return out

    def close_plain(self, now: float) -> list[Action]:
        """Close (1001) every connection without the drain extension, once its short grace is over."""
        out: list[Action] = []
        for state in list(self._conns.values()):
            if not state.drain and not state.closing:
                self._shut(state, now, out)
        return out

    def finish_drain(self, now: float) -> list[Action]:
        """Close (1001) every connection still open; after this the core's state no longer changes.

        Drain connections that have not said ``drained`` by now (the shell's ``drain_timeout``) are
        counted in ``drain_timeouts``.  Sessions are detached before their sockets close, so the state
        snapshot taken next is final: nothing more is routed to (or read from) these connections.
        """
        out: list[Action] = []
        self.counters["drain_timeouts"] += len(self._awaiting)
        self._awaiting.clear()
        for state in list(self._conns.values()):
            if not state.closing:
                self._shut(state, now, out)
        return out

    def _notify_draining(self, state: _Conn, out: list[Action]) -> None:
        session = state.session
        assert session is not None
        self._awaiting.add(state.conn)
        self.counters["drain_notices"] += 1
        notice = Message(
            id=next(self._notice_ids), type="update", from_=SESSION_URL, to=session.url, body={"value": "draining"}
        )
        out.append(Send(state.conn, encode(notice)))

    def _shut(self, state: _Conn, now: float, out: list[Action]) -> None:
        session = state.session
        if session is not None and session.conn is state.conn:
            state.session = None
            self._detach(session, now, out)
        self._close_conn(state, CLOSE_GOING_AWAY, _SHUTDOWN_REASON, out)

    def _drained(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        """``update`` ``{value: "drained"}`` to ``mn:/session``: the drain client's last frame (no answer)."""
        value = (msg.body or {}).get("value")
        if not isinstance(value, str) or value.lower() != "drained":
            self._error(
                state,
                msg,
                400,
                f"body.value: {SESSION_URL} accepts an update only with value 'drained' (drain extension)",
                out,
            )
            return
        session = state.session
        if session is None or not state.drain:
            self._error(
                state,
                msg,
                409,
                "drained: this connection did not negotiate the drain extension "
                '(send "drain": true in open or re-open)',
                out,
            )
            return
        if not self._draining:
            self._error(state, msg, 409, "drained: this message node is not draining", out)
            return
        if state.conn in self._awaiting:
            self._awaiting.discard(state.conn)
            self.counters["drained"] += 1
            out.append(Drained(state.conn, len(self._awaiting)))

    # -- state snapshot ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a restarted node needs, as plain JSON-able data that shares nothing with the core.

        Sessions are exported whether connected or not: a restored node holds them all detached.
        """
        state = _State(STATE_FORMAT, STATE_VERSION, self.domain, [_export(s) for s in self._sessions.values()])
        return msgspec.to_builtins(state)

    def restore(self, snapshot: Any, now: float) -> int:
        """Load a :meth:`snapshot` into this (empty) core; every session detached until ``now + session_grace``.

        Raises :class:`StateError` naming the field at fault; nothing is loaded then.  Returns the number of
        sessions loaded.
        """
        if self._sessions or self._conns:
            raise StateError("restore: this message node already has sessions or connections")
        try:
            state = msgspec.convert(snapshot, _State)
        except msgspec.ValidationError as exc:
            raise StateError(_state_error_text(exc)) from None
        if state.format != STATE_FORMAT:
            raise StateError(f"format: {state.format!r} is not a message node state ({STATE_FORMAT!r})")
        if state.version != STATE_VERSION:
            raise StateError(f"version: {state.version} is not supported (this node reads version {STATE_VERSION})")
        if state.domain != self.domain:
            raise StateError(f"domain: the state is of msg-node.{state.domain}, this node serves {self.domain}")
        sessions: dict[str, Session] = {}
        by_runtime: dict[str, Session] = {}
        owner: dict[str, Session] = {}
        for index, saved in enumerate(state.sessions):
            session = _import(saved, f"sessions[{index}]", owner)
            if session.url in sessions or session.runtime_url in by_runtime:
                raise StateError(f"sessions[{index}].runtimeURL: a second session of {session.runtime_url}")
            sessions[session.url] = session
            by_runtime[session.runtime_url] = session
        # all checked: install
        self._sessions = sessions
        self._by_runtime = by_runtime
        self._owner = owner
        deadline = now + max(self.session_grace, 0.0)  # a zero grace expires them at the first tick
        for session in sessions.values():
            for resource in session.subscriptions:
                self._subscribers.setdefault(resource, {})[session] = None
            session.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, next(self._seq), session))
        self.counters["sessions_restored"] += len(sessions)
        return len(sessions)

    # -- routing -----------------------------------------------------------------------------------

    def _route(self, state: _Conn, msg: Message, raw: Any, out: list[Action]) -> None:
        to: str = msg.to  # type: ignore[assignment]  # normalised to one string by Message
        component = self._components.get(to)
        if component is not None:
            component(state, msg, out)
            return
        session = state.session
        if session is None:
            self._error(state, msg, 403, f"no session on this connection: send 'open' to {SESSION_URL} first", out)
            return
        if msg.type in _SESSION_TYPES:
            self._error(state, msg, 400, f"type: '{msg.type}' is only valid to {SESSION_URL}", out)
            return
        sender = msg.from_
        owner = self._owner.get(sender)
        if owner is not session:
            if not self._claim_from(session, sender, owner):
                self._error(state, msg, 403, f"from: {sender} is allocated to another session", out)
                return
        elif sender in session.bound:  # refresh its place in the LRU order
            del session.bound[sender]
            session.bound[sender] = None
        target = self._owner.get(to)
        if target is None:
            target = self._runtime_session(to)
        if target is not None:
            conn = target.conn
            if conn is None:
                self._hold(state, target, msg, raw, out)
                return
            self.counters["delivered"] += 1
            out.append(Send(conn, encode(msg) if raw is None else raw))
            return
        subscribers = self._subscribers.get(to)
        if subscribers:
            self._fan_out(state, msg, subscribers, encode(msg) if raw is None else raw, out)
            return
        if to.startswith(self._registry_prefixes):
            self._registry_component(state, msg, out)
        elif to.startswith(self._node_prefix):
            self._not_found(state, msg, f"{to} is not a component of this message node", out)
        else:
            self._not_found(
                state,
                msg,
                f"no route to {to}: not an allocated address, runtime or subscribed resource on msg-node.{self.domain}",
                out,
            )

    def _fan_out(
        self, state: _Conn, msg: Message, subscribers: dict[Session, None], data: Any, out: list[Action]
    ) -> None:
        delivered = 0
        full: list[Session] = []
        for session in subscribers:
            conn = session.conn
            if conn is None:
                if self._keep(session, bytes(data)):
                    self.counters["buffered"] += 1
                else:
                    full.append(session)
            else:
                out.append(Send(conn, data))
                delivered += 1
        self.counters["delivered"] += 1
        self.counters["fanout_deliveries"] += delivered
        if full:
            self.counters["buffer_full"] += len(full)
            self._error(
                state,
                msg,
                503,
                f"{msg.to}: {len(full)} subscriber session(s) are detached and their "
                f"buffers are full (e.g. {full[0].url}); they miss this message",
                out,
            )

    # -- buffers of detached sessions ----------------------------------------------------------------

    def _hold(self, state: _Conn, target: Session, msg: Message, raw: Any, out: list[Action]) -> None:
        """Keep a point-to-point message for a detached session, or tell the sender its buffer is full."""
        if self._keep(target, encode(msg) if raw is None else bytes(raw)):
            self.counters["buffered"] += 1
            return
        self.counters["buffer_full"] += 1
        self._error(
            state,
            msg,
            503,
            f"{msg.to} belongs to a detached session (waiting for its re-open) "
            f"whose buffer is full ({len(target.buffer)} messages, {target.buffer_bytes} bytes)",
            out,
        )

    def _keep(self, session: Session, data: bytes) -> bool:
        size = len(data)
        if len(session.buffer) >= self.buffer_messages or session.buffer_bytes + size > self.buffer_bytes:
            return False
        session.buffer.append(data)
        session.buffer_bytes += size
        return True

    def _deliver(self, data: bytes, to: str, out: list[Action]) -> None:
        """Route one node-made response (no sender session): point to point, buffered if detached."""
        target = self._owner.get(to) or self._runtime_session(to)
        if target is None:
            self.counters["responses_dropped"] += 1
        elif target.conn is not None:
            self.counters["delivered"] += 1
            out.append(Send(target.conn, data))
        elif self._keep(target, data):
            self.counters["buffered"] += 1
        else:
            self.counters["buffer_full"] += 1
            self.counters["responses_dropped"] += 1

    def _answer_buffer(self, session: Session, reason: str, out: list[Action]) -> None:
        """A session ends with messages still buffered: ``410`` to the sender of each, never silence.

        Fan-out copies are answered too (the publisher learns which subscriber missed its update);
        responses are discarded, as a response is never answered (counted in ``buffer_discarded``).
        """
        buffered, session.buffer, session.buffer_bytes = session.buffer, [], 0
        for data in buffered:
            try:
                msg: Message | None = decode(data, max_size=len(data))
            except MessageError:
                msg = None
            if msg is None or msg.type == "response":
                self.counters["buffer_discarded"] += 1
                continue
            self.counters["buffer_answered"] += 1
            gone = response(
                msg, 410, f"{msg.to}: its session {session.url} {reason} before this message could be delivered"
            )
            self._deliver(encode(gone), msg.from_, out)

    def _runtime_session(self, to: str) -> Session | None:
        """The session whose runtime URL is ``to`` or a prefix of it ending at a ``/``."""
        by_runtime = self._by_runtime
        session = by_runtime.get(to)
        end = to.rfind("/")
        while session is None and end > 0:
            session = by_runtime.get(to[:end])
            end = to.rfind("/", 0, end)
        return session

    def _claim_from(self, session: Session, sender: str, owner: Session | None) -> bool:
        """Accept a ``from`` this session does not own yet, binding an unknown ``hyperty://`` to it.

        This is the Vert.x transition handler: binding lets the reply to a foreign hyperty find its way
        back through the session it came from.  Bound addresses are capped per session, least recently
        used evicted first, so a peer that invents senders cannot grow the node's tables without bound.
        """
        if owner is None:
            if sender.startswith("hyperty://"):
                self._bind(session, sender)
            return True
        if sender in owner.bound:  # a foreign address moves to the session that last spoke for it
            del owner.bound[sender]
            self._bind(session, sender)
            return True
        return False

    def _bind(self, session: Session, address: str) -> None:
        bound = session.bound
        if len(bound) >= self.max_bound:
            oldest = next(iter(bound))
            del bound[oldest]
            del self._owner[oldest]
            self.counters["bound_evicted"] += 1
        bound[address] = None
        self._owner[address] = session
        self.counters["bound"] += 1

    # -- mn:/session ---------------------------------------------------------------------------------

    def _session_component(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        kind = msg.type
        if kind == "open":
            self._open(state, msg, out)
        elif kind == "re-open":
            self._reopen(state, msg, out)
        elif kind == "close":
            self._close(state, msg, out)
        elif kind == "update":
            self._drained(state, msg, out)
        elif kind == "response":
            self.counters["responses_dropped"] += 1
        else:
            self._error(
                state,
                msg,
                405,
                f"type: {SESSION_URL} accepts open, re-open, close and update (drained), not '{kind}'",
                out,
            )

    def _open(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        runtime = msg.from_
        try:
            parse(runtime)
        except AddressError as exc:
            self._error(state, msg, 400, f"from: {exc}", out)
            return
        if not self._authenticated(state, msg, out):
            return
        current = state.session
        if current is not None:
            if current.runtime_url != runtime:
                self._error(
                    state,
                    msg,
                    409,
                    f"this connection already carries the session of {current.runtime_url}: close it first",
                    out,
                )
                return
            self._granted(state, msg, current, out)  # a repeated open is answered, not doubled
            return
        old = self._by_runtime.get(runtime)
        if old is not None:
            if old.conn is not None:
                self._error(
                    state,
                    msg,
                    409,
                    f"{runtime} already has a connected session: re-open it with "
                    "its runtimeToken, or retry once that connection is gone",
                    out,
                )
                return
            self._end(old, "replaced", out)
        token = self._new_id()
        session = Session(runtime_url=runtime, token=token, url=f"{runtime}/{token}", conn=state.conn)
        self._sessions[session.url] = session
        self._by_runtime[runtime] = session
        state.session = session
        self.counters["sessions_opened"] += 1
        self._granted(state, msg, session, out)

    def _reopen(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        session = self._sessions.get(msg.from_)
        if session is None:
            self._error(
                state,
                msg,
                404,
                f"re-open: unknown session {msg.from_} (closed, expired or the node "
                "restarted): send 'open' for a new session",
                out,
            )
            return
        current = state.session
        if current is not None and current is not session:
            self._error(
                state,
                msg,
                409,
                f"this connection already carries the session of {current.runtime_url}: close it first",
                out,
            )
            return
        previous = session.conn
        if previous is not None and previous is not state.conn:
            other = self._conns.get(previous)
            if other is not None:
                other.session = None
                self._close_conn(other, CLOSE_SESSION_TAKEN_OVER, "session re-opened on another connection", out)
        session.conn = state.conn
        session.deadline = None
        state.session = session
        self.counters["sessions_reopened"] += 1
        self._granted(state, msg, session, out)

    def _granted(self, state: _Conn, msg: Message, session: Session, out: list[Action]) -> None:
        """The ``200``, then (in this order) batching, the session's buffered messages, ``draining``."""
        body = msg.body or {}
        asked = body.get("batch") is True
        extra: dict[str, Any] = {"runtimeToken": session.token}
        if asked or state.batch:  # once granted, an extension lasts as long as the connection
            extra["batch"] = True
            extra["maxFrame"] = self.max_frame
        if body.get("drain") is True:
            state.drain = True
        if state.drain:
            extra["drain"] = True
        session.drain = state.drain
        session.batch = state.batch or asked
        self._reply(state, response(msg, 200, **extra), out)
        if asked and not state.batch:
            state.batch = True
            out.append(EnableBatch(state.conn, self.max_frame))
        if session.buffer:
            frames = session.buffer
            session.buffer = []
            session.buffer_bytes = 0
            self.counters["replayed"] += len(frames)
            out.append(Replay(state.conn, frames))
        if self._draining and state.drain and state.conn not in self._awaiting:
            self._notify_draining(state, out)

    def _authenticated(self, state: _Conn, msg: Message, out: list[Action]) -> bool:
        if self._auth is None:
            return True
        token = (msg.body or {}).get("accessToken")
        if token is None:
            self._error(state, msg, 401, "open: this node requires body.accessToken", out)
            return False
        if not isinstance(token, str):
            self._error(state, msg, 400, "body.accessToken: expected a string", out)
            return False
        given = token.encode()
        # compare against every token so the time taken says nothing about which one nearly matched
        ok = False
        for accepted in self._auth:
            ok |= hmac.compare_digest(given, accepted)
        if not ok:
            self._error(state, msg, 403, "open: body.accessToken is not accepted by this node", out)
        return ok

    def _close(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        session = state.session
        if session is None:
            self._error(state, msg, 404, "close: no session on this connection", out)
            return
        sender = msg.from_
        if not (sender == session.runtime_url or sender.startswith(session.runtime_url + "/")):
            self._error(
                state, msg, 403, f"close: {sender} is not within this session's runtime {session.runtime_url}", out
            )
            return
        self._reply(state, response(msg, 200), out)
        self._end(session, "closed", out)
        self._close_conn(state, CLOSE_NORMAL, "session closed", out)

    def _detach(self, session: Session, now: float, out: list[Action]) -> None:
        """The session's socket is gone (or going): it waits ``session_grace`` seconds for a re-open."""
        session.conn = None
        if self.session_grace <= 0:
            self._end(session, "expired", out)
            return
        session.deadline = now + self.session_grace
        heapq.heappush(self._deadlines, (session.deadline, next(self._seq), session))

    def _end(self, session: Session, reason: str, out: list[Action]) -> None:
        """Free everything the session holds; its connection (if any) stays open but session-less."""
        del self._sessions[session.url]
        if self._by_runtime.get(session.runtime_url) is session:
            del self._by_runtime[session.runtime_url]
        owner = self._owner
        freed = 0
        for address in itertools.chain(session.addresses, session.bound):
            if owner.get(address) is session:
                del owner[address]
                freed += 1
        self.counters["addresses_freed"] += len(session.addresses)
        for resource in session.subscriptions:
            self._drop_subscriber(resource, session)
        session.addresses = set()
        session.keys = {}
        session.bound = {}
        session.subscriptions = {}
        session.subscription_count = 0
        if session.conn is not None:
            state = self._conns.get(session.conn)
            if state is not None and state.session is session:
                state.session = None
            session.conn = None
        session.deadline = None
        self.counters[f"sessions_{reason}"] += 1
        out.append(SessionEnded(session.url, session.runtime_url, reason, freed))
        if session.buffer:  # after the tables are freed: no answer can route back into this session
            self._answer_buffer(session, _ENDED[reason], out)

    # -- address allocation --------------------------------------------------------------------------

    def _component_session(self, state: _Conn, msg: Message, out: list[Action]) -> Session | None:
        """The sender's session for a node component, or None once the message is counted or answered."""
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return None
        if state.session is None:
            self._error(state, msg, 403, f"no session on this connection: send 'open' to {SESSION_URL} first", out)
        return state.session

    def _allocation_component(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        kind = msg.type
        session = self._component_session(state, msg, out)
        if session is None:
            return
        if kind == "create":
            self._allocate(state, session, msg, out)
        elif kind == "delete":
            self._deallocate(state, session, msg, out)
        else:
            self._error(state, msg, 405, f"type: {msg.to} accepts create and delete, not '{kind}'", out)

    def _allocate(self, state: _Conn, session: Session, msg: Message, out: list[Action]) -> None:
        try:
            scheme, number, key = self._allocation_request(msg)
        except MessageError as exc:
            self._error(state, msg, 400, str(exc), out)
            return
        if len(session.addresses) + number > self.max_addresses:
            self._error(
                state,
                msg,
                403,
                f"number: this session holds {len(session.addresses)} addresses and may "
                f"hold at most {self.max_addresses}",
                out,
            )
            return
        prefix = f"{scheme}://{self.domain}/"
        allocated = [prefix + self._new_id() for _ in range(number)]
        session.addresses.update(allocated)
        for address in allocated:
            self._owner[address] = session
        if key is not None:
            session.keys.setdefault(key, []).extend(allocated)
        self.counters["addresses_allocated"] += number
        value: dict[str, Any] = {"allocated": allocated}
        if key is not None:
            value["allocationKey"] = key
        self._reply(state, response(msg, 200, value=value), out)

    def _allocation_request(self, msg: Message) -> tuple[str, int, str | None]:
        """``(scheme, number, allocationKey)`` from either the spec layout (``body.value``) or a flat body."""
        body = msg.body or {}
        value = body.get("value")
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            raise MessageError(f"body.value: expected an object, got {type(value).__name__}")

        def field(name: str) -> Any:
            return value[name] if name in value else body.get(name)

        number = field("number")
        if number is None:
            number = 1
        if type(number) is not int or not 1 <= number <= self.max_block:
            raise MessageError(f"body.value.number: expected an integer from 1 to {self.max_block}, got {number!r}")
        key = field("allocationKey")
        if key is not None and (not isinstance(key, str) or not key):
            raise MessageError("body.value.allocationKey: expected a non-empty string")
        if msg.to == self.hyperty_allocation_url:
            return "hyperty", number, key  # this endpoint ignores any scheme, as reTHINK
        scheme = field("scheme")
        if scheme is None:
            if msg.to == self.object_allocation_url:
                raise MessageError("body.scheme: required for object allocation (e.g. 'comm', 'ctxt')")
            scheme = "hyperty"
        if not isinstance(scheme, str) or not _SCHEME.match(scheme):
            raise MessageError(f"body.scheme: {scheme!r} is not a URL scheme (lower case letters, digits, +.-)")
        if scheme in _RESERVED_SCHEMES or scheme.startswith("domain-"):
            raise MessageError(f"body.scheme: {scheme!r} is reserved and cannot be allocated")
        return scheme, number, key

    def _deallocate(self, state: _Conn, session: Session, msg: Message, out: list[Action]) -> None:
        body = msg.body or {}
        resource = body.get("resource")
        children = body.get("childrenResources")
        if resource is None and children is None:
            self._error(
                state,
                msg,
                400,
                "body.resource (an allocationKey or address) or body.childrenResources is required to deallocate",
                out,
            )
            return
        freeing: list[str] = []
        keys: list[str] = []
        if resource is not None:
            if not isinstance(resource, str):
                self._error(state, msg, 400, "body.resource: expected a string", out)
                return
            if resource in session.keys:
                keys.append(resource)
                freeing.extend(session.keys[resource])
            elif resource in session.addresses:
                freeing.append(resource)
            else:
                self._error(
                    state,
                    msg,
                    404,
                    f"body.resource: {resource} is neither an allocationKey nor an address of this session",
                    out,
                )
                return
        if children is not None:
            if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
                self._error(state, msg, 400, "body.childrenResources: expected a list of addresses", out)
                return
            unknown = [c for c in children if c not in session.addresses]
            if unknown:
                self._error(
                    state,
                    msg,
                    404,
                    f"body.childrenResources: {unknown[0]} is not an address of this "
                    f"session ({len(unknown)} unknown, nothing freed)",
                    out,
                )
                return
            freeing.extend(children)
        freed = self._free(session, freeing, keys)
        self._reply(state, response(msg, 200, value={"deallocated": freed}), out)

    def _free(self, session: Session, addresses: list[str], keys: list[str]) -> list[str]:
        freed: list[str] = []
        for address in addresses:
            if address in session.addresses:
                session.addresses.discard(address)
                if self._owner.get(address) is session:
                    del self._owner[address]
                freed.append(address)
        for key in keys:
            session.keys.pop(key, None)
        if freed:
            gone = set(freed)
            for key, block in list(session.keys.items()):
                remaining = [a for a in block if a not in gone]
                if remaining:
                    session.keys[key] = remaining
                else:
                    del session.keys[key]
        self.counters["addresses_freed"] += len(freed)
        return freed

    # -- subscriptions -------------------------------------------------------------------------------

    def _subscription_component(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        kind = msg.type
        session = self._component_session(state, msg, out)
        if session is None:
            return
        if kind not in ("subscribe", "unsubscribe"):
            self._error(state, msg, 405, f"type: {msg.to} accepts subscribe and unsubscribe, not '{kind}'", out)
            return
        try:
            resources, source = self._subscription_request(msg)
        except MessageError as exc:
            self._error(state, msg, 400, str(exc), out)
            return
        if kind == "subscribe":
            added = self._subscribe(session, resources, source or msg.from_)
            if added is None:
                self._error(
                    state,
                    msg,
                    403,
                    f"body.resources: this session may hold at most {self.max_subscriptions} subscriptions",
                    out,
                )
                return
        else:
            self._unsubscribe(session, resources, source)
        self._reply(state, response(msg, 200), out)

    def _subscription_request(self, msg: Message) -> tuple[list[str], str | None]:
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
                raise MessageError(f"body.{key}: expected a list of resource addresses")
            for item in value:
                if not isinstance(item, str):
                    raise MessageError(f"body.{key}: expected a list of resource addresses, found {item!r}")
                try:
                    parse(item)
                except AddressError as exc:
                    raise MessageError(f"body.{key}: {exc}") from None
                resources.append(item)
        if not seen_key:
            raise MessageError(
                f"body.resources: missing (the list of resources to {msg.type}; 'body.{msg.type}' is accepted too)"
            )
        source = body.get("source")
        if source is not None and (not isinstance(source, str) or not source):
            raise MessageError("body.source: expected a non-empty address")
        return resources, source

    def _subscribe(self, session: Session, resources: list[str], source: str) -> int | None:
        new = sum(1 for r in resources if source not in session.subscriptions.get(r, ()))
        if session.subscription_count + new > self.max_subscriptions:
            return None
        for resource in resources:
            sources = session.subscriptions.setdefault(resource, set())
            if source not in sources:
                sources.add(source)
                session.subscription_count += 1
            self._subscribers.setdefault(resource, {})[session] = None
        return new

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
                self._drop_subscriber(resource, session)

    def _drop_subscriber(self, resource: str, session: Session) -> None:
        subscribers = self._subscribers.get(resource)
        if subscribers is not None:
            subscribers.pop(session, None)
            if not subscribers:
                del self._subscribers[resource]

    # -- registries ----------------------------------------------------------------------------------

    def _registry_component(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return
        self._error(state, msg, 501, f"{msg.to}: no registry is connected to this message node", out)

    # -- replies -------------------------------------------------------------------------------------

    def _close_conn(self, state: _Conn, code: int, reason: str, out: list[Action]) -> None:
        state.closing = True
        out.append(Close(state.conn, code, _reason(reason)))

    def _reply(self, state: _Conn, msg: Message, out: list[Action]) -> None:
        out.append(Send(state.conn, encode(msg)))

    def _error(self, state: _Conn, msg: Message, code: int, description: str, out: list[Action]) -> None:
        """Answer a request with an error; a response is never answered (two nodes could loop)."""
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return
        self.counters["errors_sent"] += 1
        out.append(Send(state.conn, encode(response(msg, code, description))))

    def _not_found(self, state: _Conn, msg: Message, description: str, out: list[Action]) -> None:
        self.counters["not_found"] += 1
        self._error(state, msg, 404, description, out)

    def _invalid(self, state: _Conn, raw: Any, text: str, out: list[Action]) -> None:
        """A frame that is not a valid message: answer 400 if a sender can be found, else close 1007."""
        self.counters["invalid"] += 1
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            obj = None
        sender = obj.get("from") if isinstance(obj, dict) else None
        if not isinstance(sender, str) or not sender:
            self._close_conn(state, CLOSE_INVALID_PAYLOAD, text, out)
            return
        kind = obj.get("type")
        if isinstance(kind, str) and kind.lower() == "response":
            self.counters["responses_dropped"] += 1
            return
        msg_id = obj.get("id")
        to = obj.get("to")
        reply = Message(
            id=msg_id if isinstance(msg_id, int | str) and not isinstance(msg_id, bool) else None,
            type="response",
            from_=to if isinstance(to, str) and to else "mn:/validator",
            to=sender,
            body={"code": 400, "description": text},
        )
        self.counters["errors_sent"] += 1
        out.append(Send(state.conn, encode(reply)))


def _export(session: Session) -> _SessionState:
    buffer = []
    for data in session.buffer:
        try:
            buffer.append(_BufferedState(data=data.decode()))
        except UnicodeDecodeError:  # forwarded verbatim from a peer that sent invalid UTF-8
            buffer.append(_BufferedState(base64=base64.b64encode(data).decode()))
    return _SessionState(
        runtime_url=session.runtime_url,
        token=session.token,
        flags={"drain": session.drain, "batch": session.batch},
        addresses=sorted(session.addresses),
        keys={key: list(block) for key, block in session.keys.items()},
        bound=list(session.bound),
        subscriptions={resource: sorted(sources) for resource, sources in session.subscriptions.items()},
        buffer=buffer,
    )


def _import(saved: _SessionState, where: str, owner: dict[str, Session]) -> Session:
    """One saved session, checked field by field; its addresses are entered into ``owner``."""
    try:
        parse(saved.runtime_url)
    except AddressError as exc:
        raise StateError(f"{where}.runtimeURL: {exc}") from None
    if not saved.token or "/" in saved.token:
        raise StateError(f"{where}.token: expected a non-empty token without '/', got {saved.token!r}")
    session = Session(runtime_url=saved.runtime_url, token=saved.token, url=f"{saved.runtime_url}/{saved.token}")
    session.drain = saved.flags.get("drain", False)
    session.batch = saved.flags.get("batch", False)
    for name, addresses in (("addresses", saved.addresses), ("bound", saved.bound)):
        for address in addresses:
            try:
                parse(address)
            except AddressError as exc:
                raise StateError(f"{where}.{name}: {exc}") from None
            if address in owner:
                raise StateError(f"{where}.{name}: {address} belongs to two sessions (or twice to this one)")
            owner[address] = session
    session.addresses = set(saved.addresses)
    session.bound = dict.fromkeys(saved.bound)
    for key, block in saved.keys.items():
        stray = [a for a in block if a not in session.addresses]
        if not block or stray:
            raise StateError(
                f"{where}.keys.{key}: expected a non-empty block of this session's addresses"
                + (f", {stray[0]} is not one" if stray else "")
            )
        session.keys[key] = list(block)
    for resource, sources in saved.subscriptions.items():
        if not sources or not all(sources):
            raise StateError(f"{where}.subscriptions.{resource}: expected a non-empty list of sources")
        session.subscriptions[resource] = set(sources)
        session.subscription_count += len(session.subscriptions[resource])
    for index, entry in enumerate(saved.buffer):
        session.buffer.append(_frame(entry, f"{where}.buffer[{index}]"))
        session.buffer_bytes += len(session.buffer[-1])
    return session


def _frame(entry: _BufferedState, where: str) -> bytes:
    if (entry.data is None) == (entry.base64 is None):
        raise StateError(f"{where}: expected exactly one of 'data' and 'base64'")
    if entry.data is not None:
        return entry.data.encode()
    try:
        return base64.b64decode(entry.base64 or "", validate=True)
    except binascii.Error as exc:
        raise StateError(f"{where}.base64: {exc}") from None


def _state_error_text(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.sessions[0].token`" as "sessions[0].token: ..."."""
    text = str(exc)
    detail, sep, where = text.rpartition(" - at `")
    if sep:
        return f"{where.rstrip('`').removeprefix('$').lstrip('.') or 'state'}: {detail}"
    if text.startswith("Object missing required field `"):
        return f"{text.split('`')[1]}: missing required field"
    return f"state: {text}"


def _starts_array(data: bytes | bytearray | memoryview) -> bool:
    for byte in bytes(data[:32]):
        if byte not in _WHITESPACE:
            return byte == 0x5B  # "["
    return False


def _reason(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= _CLOSE_REASON_MAX:
        return text
    return encoded[: _CLOSE_REASON_MAX - 3].decode(errors="ignore") + "..."
