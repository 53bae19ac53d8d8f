"""The message node's protocol, without any I/O: sessions, allocations, subscriptions and routing.

:class:`MessageNodeCore` is a plain object.  The shell (``server.py``) tells it what happened on the
network (``connected``, ``received``, ``received_binary``, ``disconnected``) and what time it is
(``tick``); every call returns the list of things the shell must now do (``actions.py``: :class:`Send`,
:class:`Close`, :class:`EnableBatch`, :class:`SessionEnded`, ...).  The core never reads a clock and never
touches a socket, so every protocol rule is unit-tested with plain function calls.

The data lives in tables, each in its own module: sessions (``session.py``), the address table
(``addresses.py``) and the subscription table (``subscriptions.py``).  The ``mn:/session`` component
(session lifecycle, drain handshake) is ``session_manager.py``, every answer is made by ``answers.py`` and
the state snapshot is ``snapshot.py``.  This module composes them and routes messages between them; the
allocation, subscription and registry components are ``components.py``, and three mixins hold the rest of
the core's interface: ``node_state.py`` (snapshot, restore, journal replay), ``cluster_calls.py`` (what a
cluster's shell reports back) and ``node_info.py`` (configuration and introspection).

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

import uuid
from collections.abc import Callable, Collection, Hashable
from typing import Any

from protofly.address import validate_domain
from protofly.message import Message, MessageError, decode, decode_frame, encode, response
from protofly.msgnode import acks
from protofly.msgnode.actions import Ack, Action, CloseCode, Send
from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.answers import Answers
from protofly.msgnode.cluster_calls import ClusterCalls
from protofly.msgnode.components import NodeComponents
from protofly.msgnode.node_info import NodeInfo
from protofly.msgnode.node_state import NodeState
from protofly.msgnode.remote import Remote
from protofly.msgnode.session import ConnState, Session, SessionTable
from protofly.msgnode.session_manager import SESSION_URL, SessionManager
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = [
    "DEFAULT_ACK_EVERY",
    "DEFAULT_ACK_EVERY_BYTES",
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_BUFFER_MESSAGES",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_SEND_QUEUE",
    "DEFAULT_SEND_QUEUE_BYTES",
    "SESSION_URL",
    "MessageNodeCore",
]

#: Largest frame accepted (and produced when packing a batch), 1 MiB unless configured.
DEFAULT_MAX_FRAME = 1 << 20
#: Messages and bytes that may wait for one slow connection before the shell disconnects it.
DEFAULT_SEND_QUEUE = 10_000
DEFAULT_SEND_QUEUE_BYTES = 8 << 20
#: Messages and bytes kept for one detached session until its re-open (beyond: ``503`` to the sender).
DEFAULT_BUFFER_MESSAGES = 10_000
DEFAULT_BUFFER_BYTES = 8 << 20
#: Numbered messages / bytes from a client after which the node acknowledges at once instead of letting
#: the ack wait for data to ride on: a quarter of a session's window (the node's ``DEFAULT_BUFFER_*``; the
#: stub's outbox, 100,000 messages / 256 MiB, is larger), so a sender streaming one way never stalls.
DEFAULT_ACK_EVERY = DEFAULT_BUFFER_MESSAGES // 4
DEFAULT_ACK_EVERY_BYTES = DEFAULT_BUFFER_BYTES // 4

_SESSION_TYPES = frozenset({"open", "re-open", "close"})

#: The protocol counters (the shell adds its I/O counters next to them).
_COUNTERS = (
    *("connections", "messages_in", "delivered", "fanout_deliveries", "invalid", "errors_sent", "not_found"),
    *("responses_dropped", "buffered", "buffer_full", "replayed", "buffer_answered", "buffer_discarded"),
    *("sessions_opened", "sessions_reopened", "sessions_closed", "sessions_expired", "sessions_replaced"),
    *("addresses_allocated", "addresses_freed", "bound", "bound_evicted", "ignored_after_close"),
    *("drain_notices", "drained", "drain_timeouts", "sessions_restored"),
    *("duplicates", "acks_sent", "acks_received", "slow_consumers_detached", "slow_answered"),
    *("forwarded", "remote_in", "sessions_claimed", "sessions_handed_off"),
)


Handler = Callable[[ConnState, Message, list[Action]], None]


class MessageNodeCore(NodeInfo, NodeState, ClusterCalls):
    """Sessions, allocations, subscriptions and routing of one domain's message node.

    Limits (all per session) keep one misbehaving runtime from exhausting the node's memory:
    ``max_addresses`` allocated addresses, ``max_block`` addresses per allocation request,
    ``max_bound`` foreign hyperties bound on the fly (least recently used evicted first) and
    ``max_subscriptions`` (resource, source) subscription pairs; a detached session keeps at most
    ``buffer_messages`` messages and ``buffer_bytes`` bytes for its re-open.  ``new_id`` makes tokens and
    addresses (injected, so that tests are deterministic).
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
        journal: bool = False,
        ack_every: int = DEFAULT_ACK_EVERY,
        ack_every_bytes: int = DEFAULT_ACK_EVERY_BYTES,
    ) -> None:
        self.domain = validate_domain(domain)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: With ``journal``: what changed since the shell last took it (``take_journal``), for the durable
        #: state (``journal.py``): ``("q", session, seq, data)`` a numbered message kept, ``("a", session, seq)``
        #: acknowledged by the runtime, ``("r", session, seq)`` received from it, ``("x",)`` anything else
        #: (sessions, allocations, subscriptions, bindings: the shell writes a full checkpoint then).
        self.journal: list[Any] | None = [] if journal else None
        #: Delayed acks: up to this many numbered messages (bytes) received from a connection its ack may
        #: wait for data going back (``Ack.delayed``); the one that reaches it is acknowledged at once.
        self.ack_every = ack_every
        self.ack_every_bytes = ack_every_bytes

        node = f"domain://msg-node.{self.domain}"
        self.allocation_url = f"{node}/address-allocation"
        self.hyperty_allocation_url = f"{node}/hyperty-address-allocation"
        self.object_allocation_url = f"{node}/object-address-allocation"
        self.subscription_url = f"{node}/sm"
        self.registry_url = f"domain://registry.{self.domain}"
        self._node_prefix = node + "/"
        self._registry_prefixes = (self.registry_url + "/", "global://registry/")

        self.sessions = SessionTable()
        self.addresses = AddressTable(
            self.domain,
            hyperty_url=self.hyperty_allocation_url,
            object_url=self.object_allocation_url,
            max_addresses=max_addresses,
            max_block=max_block,
            max_bound=max_bound,
            new_id=new_id,
            counters=self.counters,
        )
        self.subscriptions = SubscriptionTable(max_subscriptions)
        self._answers = Answers(self.counters)
        self.manager = SessionManager(
            self.sessions,
            self.addresses,
            self.subscriptions,
            self._answers,
            self.counters,
            session_grace=session_grace,
            auth_tokens=auth_tokens,
            max_frame=max_frame,
            buffer_messages=buffer_messages,
            buffer_bytes=buffer_bytes,
            new_id=new_id,
            journal=self.journal,
        )
        parts = NodeComponents(self.addresses, self.subscriptions, self._answers, self.manager, self.counters)
        self._registry_component = parts.registry
        self._components: dict[str, Handler] = {
            SESSION_URL: self.manager.handle,
            self.allocation_url: parts.allocation,
            self.hyperty_allocation_url: parts.allocation,
            self.object_allocation_url: parts.allocation,
            self.subscription_url: parts.subscription,
            self.registry_url: parts.registry,
            self.registry_url + "/": parts.registry,
            "global://registry": parts.registry,
            "global://registry/": parts.registry,
        }

    # -- the rest of a cluster (None: a single-process node) ----------------------------------------------

    @property
    def remote(self) -> Remote | None:
        return self.manager.remote

    @remote.setter
    def remote(self, remote: Remote | None) -> None:
        """Plug a cluster in (``msgnode/cluster/``): routing misses, session and subscription changes go to it."""
        self.manager.remote = remote
        self.subscriptions.on_change = None if remote is None else remote.resource_changed

    # -- events ------------------------------------------------------------------------------------

    def connected(self, conn: Hashable) -> list[Action]:
        self.manager.conns[conn] = ConnState(conn)
        self.counters["connections"] += 1
        return []

    def received(self, conn: Hashable, data: bytes | bytearray | memoryview | str | Message) -> list[Action]:
        """One text frame (or an already-decoded message) arrived on ``conn``.

        Whatever the bytes, the answer is actions: a ``400`` response to a sender that can be read, else a
        close with ``1007`` (invalid data: bad JSON, invalid UTF-8) or ``1009`` (too big); never an exception.
        """
        state = self.manager.state(conn)
        counters = self.counters
        if state.closing:
            counters["ignored_after_close"] += 1
            return []
        out: list[Action] = []
        if type(data) is not bytes:
            if isinstance(data, Message):
                counters["messages_in"] += 1
                self._route(state, data, None, out)
                return out
            if isinstance(data, str):  # a shell that decoded the text frame itself
                try:
                    data = data.encode()
                except UnicodeEncodeError as exc:
                    counters["invalid"] += 1
                    text = f"text frame is not valid Unicode (lone surrogate at character {exc.start})"
                    self._answers.close(state, CloseCode.INVALID_DATA, text, out)
                    return out
            else:
                data = bytes(data)
        if len(data) > self.max_frame:
            counters["invalid"] += 1
            text = f"frame of {len(data)} bytes is over the {self.max_frame}-byte limit"
            self._answers.close(state, CloseCode.MESSAGE_TOO_BIG, text, out)
            return out
        if state.ack and data[:1] == b"[":
            numbered = acks.split(data)
            if numbered is not None:
                self._numbered(state, numbered[0], numbered[1], out)
                return out
        if not state.batch:  # the common case: one message per frame
            counters["messages_in"] += 1
            try:
                msg = decode(data, max_size=self.max_frame)
            except MessageError as exc:
                self._answers.invalid(state, data, str(exc), out)
                return out
            self._route(state, msg, data, out)
            return out
        try:  # batching granted: the frame may be a JSON array of messages
            items = decode_frame(data, max_size=self.max_frame)
        except MessageError as exc:
            counters["invalid"] += 1
            self._answers.close(state, CloseCode.INVALID_DATA, str(exc), out)
            return out
        for item, raw, _ in items:
            if state.closing:  # an element of this batch already condemned the connection
                break
            counters["messages_in"] += 1
            if isinstance(item, MessageError):
                self._answers.invalid(state, raw, str(item), out)
            else:
                self._route(state, item, raw, out)
        return out

    def _numbered(self, state: ConnState, seq: int, rest: bytes, out: list[Action]) -> None:
        """A numbered frame (ack extension): route what is new, drop duplicates, acknowledge the last.

        The ack is ``delayed`` (it rides on the next data to this connection, or waits the shell's
        ``ack_delay``) unless ``ack_every`` messages or ``ack_every_bytes`` came since the last urgent one.
        """
        counters = self.counters
        session = state.session
        if session is None:
            counters["invalid"] += 1
            self._answers.close(state, CloseCode.PROTOCOL_ERROR, "numbered frame before a session was opened", out)
            return
        try:
            items = decode_frame(rest, max_size=self.max_frame)
        except MessageError as exc:
            counters["invalid"] += 1
            self._answers.close(state, CloseCode.INVALID_DATA, str(exc), out)
            return
        for index, (item, raw, _) in enumerate(items):
            if state.closing:
                break
            number = seq + index
            if number <= session.received:
                counters["duplicates"] += 1
                continue
            session.received = number
            counters["messages_in"] += 1
            if isinstance(item, MessageError):
                self._answers.invalid(state, raw, str(item), out)
            else:
                self._route(state, item, raw, out)
        if self.journal is not None:
            self.journal.append(("r", session.url, session.received))
        if not state.closing and state.session is session:
            counters["acks_sent"] += 1
            state.unacked_in += len(items)
            state.unacked_in_bytes += len(rest)
            urgent = state.unacked_in >= self.ack_every or state.unacked_in_bytes >= self.ack_every_bytes
            if urgent:
                state.unacked_in = state.unacked_in_bytes = 0
            out.append(Ack(state.conn, acks.ack_message(session.url, session.received), not urgent))

    def received_binary(self, conn: Hashable) -> list[Action]:
        """reTHINK carries JSON in text frames only; a binary frame means a confused peer."""
        state = self.manager.state(conn)
        if state.closing:
            self.counters["ignored_after_close"] += 1
            return []
        self.counters["invalid"] += 1
        out: list[Action] = []
        text = "binary frames are not supported: send JSON text frames"
        self._answers.close(state, CloseCode.UNSUPPORTED_DATA, text, out)
        return out

    def disconnected(self, conn: Hashable, now: float) -> list[Action]:
        """The socket is gone: its session (if any) waits ``session_grace`` seconds for a re-open."""
        out: list[Action] = []
        self.manager.disconnected(conn, now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Expire the detached sessions whose grace period is over, freeing their addresses."""
        out: list[Action] = []
        ended = self.counters["sessions_expired"]
        self.manager.expire(now, out)
        if self.journal is not None and self.counters["sessions_expired"] != ended:
            self.journal.append(("x",))
        return out

    def slow_consumer(self, conn: Hashable, pending: list[Any], now: float) -> list[Action]:
        """The shell cut ``conn`` off (it did not read): detach its session and keep what it did not get.

        ``pending`` is what was queued for the connection and never written.  A session with
        acknowledged delivery still holds all of it (numbered, unacknowledged), so nothing is to do but
        detach.  A plain session keeps the messages in its buffer, up to its bounds; each one beyond
        them is answered ``503`` to its sender, so no message disappears without an answer (messages
        already in the socket's kernel buffer are beyond the node's reach: docs/msgnode.md).
        """
        out: list[Action] = []
        state = self.manager.conns.get(conn)
        session = None if state is None else state.session
        if state is None or session is None or session.conn is not conn:
            return out
        self.counters["slow_consumers_detached"] += 1
        state.session = None
        self.manager.detach(session, now, out)
        if session.ack:
            return out
        for data in pending:
            raw = bytes(data)
            if raw[:1] != b"{":
                continue  # a numbered frame or a packed array: not a message of this plain session
            if session.keep(raw, self.buffer_messages, self.buffer_bytes):
                self.counters["buffered"] += 1
                continue
            try:
                msg = decode(raw, max_size=len(raw))
            except MessageError:
                continue
            if msg.type == "response" or msg.from_ == SESSION_URL:
                self.counters["buffer_discarded"] += 1
                continue
            self.counters["slow_answered"] += 1
            text = f"{msg.to}: its session {session.url} stopped reading and its buffer is full"
            self.manager.deliver(encode(response(msg, 503, text)), msg.from_, out)
        return out

    # -- graceful stop (drain extension) --------------------------------------------------------------

    def begin_drain(self) -> list[Action]:
        """The node is stopping: tell every drain connection ``draining``; routing goes on as usual.

        A connection that negotiates drain later (an ``open`` arriving during the drain) is told at once.
        """
        out: list[Action] = []
        self.manager.begin_drain(out)
        return out

    def close_plain(self, now: float) -> list[Action]:
        """Close (1001) every connection without the drain extension, once its short grace is over."""
        out: list[Action] = []
        self.manager.close_plain(now, out)
        return out

    def finish_drain(self, now: float) -> list[Action]:
        """Close (1001) every connection still open; after this the core's state no longer changes.

        Drain connections that have not said ``drained`` by now (the shell's ``drain_timeout``) are
        counted in ``drain_timeouts``.  Sessions are detached before their sockets close, so the state
        snapshot taken next is final: nothing more is routed to (or read from) these connections.
        """
        out: list[Action] = []
        self.manager.finish_drain(now, out)
        return out

    # -- routing -----------------------------------------------------------------------------------

    def _route(self, state: ConnState, msg: Message, raw: Any, out: list[Action]) -> None:
        to = msg.to
        component = self._components.get(to)
        if component is not None:
            component(state, msg, out)
            if self.journal is not None and msg.type != "update" and msg.type != "response":
                self.journal.append(("x",))  # a session, an allocation or a subscription may have changed
            return
        session = state.session
        if session is None:
            self._answers.error(
                state, msg, 403, f"no session on this connection: send 'open' to {SESSION_URL} first", out
            )
            return
        if msg.type in _SESSION_TYPES:
            self._answers.error(state, msg, 400, f"type: '{msg.type}' is only valid to {SESSION_URL}", out)
            return
        bound = self.counters["bound"]
        if not self.addresses.claim(session, msg.from_):
            self._answers.error(state, msg, 403, f"from: {msg.from_} is allocated to another session", out)
            return
        if self.counters["bound"] != bound:  # a foreign sender bound on the fly: journal it, tell the cluster
            if self.journal is not None:
                self.journal.append(("x",))
            if self.remote is not None:
                self.remote.session_changed(session, "updated")
        target = self.addresses.owner(to) or self.sessions.route(to)
        if target is not None:
            if target.ack:
                self._number(state, target, msg, raw, out)
                return
            conn = target.conn
            if conn is None:
                self._hold(state, target, msg, raw, out)
                return
            self.counters["delivered"] += 1
            out.append(Send(conn, encode(msg) if raw is None else raw))
            return
        remote = self.remote
        if remote is not None and remote.forward(to, encode(msg) if raw is None else bytes(raw)):
            self.counters["forwarded"] += 1
            return
        subscribers = self.subscriptions.subscribers(to)
        if remote is not None and remote.fan_out(to, encode(msg) if raw is None else bytes(raw)):
            self.counters["forwarded"] += 1
            if subscribers:
                self._fan_out(state, msg, subscribers, encode(msg) if raw is None else raw, out)
            return
        if subscribers:
            self._fan_out(state, msg, subscribers, encode(msg) if raw is None else raw, out)
            return
        if to.startswith(self._registry_prefixes):
            self._registry_component(state, msg, out)
        elif to.startswith(self._node_prefix):
            self._answers.not_found(state, msg, f"{to} is not a component of this message node", out)
        else:
            text = (
                f"no route to {to}: not an allocated address, runtime or subscribed resource on msg-node.{self.domain}"
            )
            self._answers.not_found(state, msg, text, out)

    def _fan_out(
        self, state: ConnState, msg: Message, subscribers: dict[Session, None], data: Any, out: list[Action]
    ) -> None:
        delivered = 0
        full: list[Session] = []
        limits = (self.buffer_messages, self.buffer_bytes)
        for session in subscribers:
            conn = session.conn
            if session.ack:
                if acks.number(session, bytes(data), out, self.journal, limits):
                    delivered += 1
                else:
                    full.append(session)
            elif conn is None:
                if session.keep(bytes(data), self.buffer_messages, self.buffer_bytes):
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
            text = (
                f"{msg.to}: {len(full)} subscriber session(s) are detached and their "
                f"buffers are full (e.g. {full[0].url}); they miss this message"
            )
            self._answers.error(state, msg, 503, text, out)

    # -- buffers of detached sessions ----------------------------------------------------------------

    def _number(self, state: ConnState, target: Session, msg: Message, raw: Any, out: list[Action]) -> None:
        """Point to point to an ack session: numbered and kept until acknowledged, or ``503`` when full.

        ``acks.number`` inlined: this runs once per message a runtime sends to another.
        """
        data = encode(msg) if raw is None else bytes(raw)
        manager = self.manager
        unacked = target.unacked
        size = len(data)
        if len(unacked) < manager.buffer_messages and target.unacked_bytes + size <= manager.buffer_bytes:
            seq = target.sent = target.sent + 1
            unacked.append(data)
            target.unacked_bytes += size
            journal = self.journal
            if journal is not None:
                journal.append(("q", target.url, seq, data))
            conn = target.conn
            if conn is not None:
                out.append(Send(conn, b"[%d,%b]" % (seq, data)))
                self.counters["delivered"] += 1
            else:
                self.counters["buffered"] += 1
            return
        self.counters["buffer_full"] += 1
        text = (
            f"{msg.to}: its session holds {len(target.unacked)} messages ({target.unacked_bytes} bytes) "
            "its runtime has not acknowledged yet; the node takes no more until it does"
        )
        self._answers.error(state, msg, 503, text, out)

    def _hold(self, state: ConnState, target: Session, msg: Message, raw: Any, out: list[Action]) -> None:
        """Keep a point-to-point message for a detached session, or tell the sender its buffer is full."""
        if target.keep(encode(msg) if raw is None else bytes(raw), self.buffer_messages, self.buffer_bytes):
            self.counters["buffered"] += 1
            return
        self.counters["buffer_full"] += 1
        text = (
            f"{msg.to} belongs to a detached session (waiting for its re-open) "
            f"whose buffer is full ({len(target.buffer)} messages, {target.buffer_bytes} bytes)"
        )
        self._answers.error(state, msg, 503, text, out)
