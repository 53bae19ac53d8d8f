"""The node's ``mn:/session`` component: connections, session lifecycle and the drain handshake.

Vert.x calls it the ``SessionManager``.  It owns the connections (what the core knows of each socket), the
accepted access tokens and the drain bookkeeping, and runs every session transition: ``open`` (a new
session, replacing a detached one of the same runtime), ``re-open`` (taking a session over, with its
buffered messages replayed), ``close``, detaching when a socket goes, expiry, and the ``draining`` /
``drained`` exchange of a graceful stop.  A session that ends gives its addresses and subscriptions back
to their tables and answers what was buffered for it with ``410``.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Callable, Collection, Hashable
from typing import Any

from protofly.address import AddressError, parse
from protofly.message import Message, MessageError, decode, encode, response
from protofly.msgnode import acks
from protofly.msgnode.actions import (
    CLOSE_SESSION_TAKEN_OVER,
    Action,
    Claim,
    CloseCode,
    Drained,
    EnableBatch,
    Replay,
    Send,
    SessionEnded,
)
from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.answers import Answers
from protofly.msgnode.remote import Remote
from protofly.msgnode.session import ConnState, Session, SessionTable
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = ["SESSION_URL", "SessionManager"]

#: The session manager component of every node (Vert.x ``SessionManager``).
SESSION_URL = "mn:/session"

_SHUTDOWN_REASON = "message node shutting down"
_ENDED = {"expired": "expired", "replaced": "was replaced by a new open", "closed": "was closed"}


class SessionManager:
    """Sessions and connections of one node; see the module docstring.  Driven by the core."""

    def __init__(
        self,
        sessions: SessionTable,
        addresses: AddressTable,
        subscriptions: SubscriptionTable,
        answers: Answers,
        counters: dict[str, int],
        *,
        session_grace: float,
        auth_tokens: Collection[str] | None,
        max_frame: int,
        buffer_messages: int,
        buffer_bytes: int,
        new_id: Callable[[], str],
        journal: list[Any] | None = None,
    ) -> None:
        self.sessions = sessions
        self.addresses = addresses
        self.subscriptions = subscriptions
        self.answers = answers
        self.counters = counters
        self.session_grace = session_grace
        self.max_frame = max_frame
        self.buffer_messages = buffer_messages
        self.buffer_bytes = buffer_bytes
        self._auth = None if auth_tokens is None else tuple(t.encode() for t in auth_tokens)
        self._new_id = new_id
        self.journal = journal
        self.conns: dict[Hashable, ConnState] = {}
        #: Set by begin_drain; the drain connections that have not said ``drained`` yet.
        self.draining = False
        self.awaiting: set[Hashable] = set()
        self._notice_ids = itertools.count(1)
        #: The rest of the cluster (None: a single-process node); told of every session transition.
        self.remote: Remote | None = None

    @property
    def auth_required(self) -> bool:
        return self._auth is not None

    # -- connections ---------------------------------------------------------------------------------

    def state(self, conn: Hashable) -> ConnState:
        """The core's record of ``conn`` (made on first sight: the shell may skip ``connected``)."""
        state = self.conns.get(conn)
        if state is None:
            state = self.conns[conn] = ConnState(conn)
        return state

    def disconnected(self, conn: Hashable, now: float, out: list[Action]) -> None:
        """The socket is gone: its session (if any) waits ``session_grace`` seconds for a re-open."""
        state = self.conns.pop(conn, None)
        if conn in self.awaiting:  # everything it sent before going was routed: as good as 'drained'
            self.awaiting.discard(conn)
            out.append(Drained(conn, len(self.awaiting)))
        if state is None or state.session is None or state.session.conn is not conn:
            return
        self.detach(state.session, now, out)

    def expire(self, now: float, out: list[Action]) -> None:
        for session in self.sessions.expired(now):
            self._end(session, "expired", out)

    # -- the component ---------------------------------------------------------------------------------

    def handle(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        """A message to ``mn:/session``."""
        kind = msg.type
        if kind == "open":
            self._open(state, msg, out)
        elif kind == "re-open":
            self._reopen(state, msg, out)
        elif kind == "close":
            self._close(state, msg, out)
        elif kind == "update":
            if isinstance((msg.body or {}).get("ack"), int):
                self._acknowledged(state, msg)
            else:
                self._drained(state, msg, out)
        elif kind == "response":
            self.counters["responses_dropped"] += 1
        else:
            text = f"type: {SESSION_URL} accepts open, re-open, close and update (drained), not '{kind}'"
            self.answers.error(state, msg, 405, text, out)

    def _open(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        runtime = msg.from_
        try:
            parse(runtime)
        except AddressError as exc:
            self.answers.error(state, msg, 400, f"from: {exc}", out)
            return
        if not self._authenticated(state, msg, out):
            return
        current = state.session
        if current is not None:
            if current.runtime_url != runtime:
                text = f"this connection already carries the session of {current.runtime_url}: close it first"
                self.answers.error(state, msg, 409, text, out)
                return
            self._granted(state, msg, current, out)  # a repeated open is answered, not doubled
            return
        old = self.sessions.of_runtime(runtime)
        if old is not None:
            if old.conn is not None:
                text = (
                    f"{runtime} already has a connected session: re-open it with "
                    "its runtimeToken, or retry once that connection is gone"
                )
                self.answers.error(state, msg, 409, text, out)
                return
            self._end(old, "replaced", out)
        token = self._new_id()
        session = Session(runtime_url=runtime, token=token, url=f"{runtime}/{token}", conn=state.conn)
        self.sessions.add(session)
        state.session = session
        self.counters["sessions_opened"] += 1
        if self.remote is not None:
            self.remote.session_changed(session, "opened")
        self._granted(state, msg, session, out)

    def _reopen(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        session = self.sessions.get(msg.from_)
        if session is None and self.remote is not None and state.session is None:
            out.append(Claim(state.conn, msg))  # another node may hold it: the shell asks the cluster
            return
        if session is None:
            text = (
                f"re-open: unknown session {msg.from_} (closed, expired or the node "
                "restarted): send 'open' for a new session"
            )
            self.answers.error(state, msg, 404, text, out)
            return
        current = state.session
        if current is not None and current is not session:
            text = f"this connection already carries the session of {current.runtime_url}: close it first"
            self.answers.error(state, msg, 409, text, out)
            return
        previous = session.conn
        if previous is not None and previous is not state.conn:
            other = self.conns.get(previous)
            if other is not None:
                other.session = None
                self.answers.close(other, CLOSE_SESSION_TAKEN_OVER, "session re-opened on another connection", out)
        session.conn = state.conn
        session.deadline = None
        state.session = session
        self.counters["sessions_reopened"] += 1
        if self.remote is not None:
            self.remote.session_changed(session, "attached")
        self._granted(state, msg, session, out)

    def _granted(self, state: ConnState, msg: Message, session: Session, out: list[Action]) -> None:
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
        numbered = self._negotiate_ack(state, body, session, extra)
        self.answers.reply(state, response(msg, 200, **extra), out)
        if asked and not state.batch:
            state.batch = True
            out.append(EnableBatch(state.conn, self.max_frame))
        if session.buffer:
            frames = session.take_buffer()
            self.counters["replayed"] += len(frames)
            out.append(Replay(state.conn, frames))
        if numbered:
            self.counters["replayed"] += len(numbered)
            out.append(Replay(state.conn, numbered))
        if self.draining and state.drain and state.conn not in self.awaiting:
            self._notify_draining(state, out)

    def _negotiate_ack(
        self, state: ConnState, body: dict[str, Any], session: Session, extra: dict[str, Any]
    ) -> list[bytes]:
        """The ack extension at open/re-open; returns the numbered frames the runtime has not acknowledged.

        With ``"ack": true`` the runtime's ``"received"`` releases what it already has and the answer says
        what the node last received from it, so that each side re-sends exactly the rest.  A connection
        without the extension (a plain reTHINK client taking the session over) gets the unacknowledged
        messages as plain frames, once, and the session stops numbering.
        """
        if body.get("ack") is True:
            state.ack = session.ack = True
            received = body.get("received")
            if type(received) is int and received > 0:
                self._released(session, received)
            extra["ack"] = True
            extra["received"] = session.received
            return [acks.frame(seq, data) for seq, data in session.numbered()]
        state.ack = False
        if not session.ack:
            return []
        session.ack = False
        frames = list(session.unacked)
        self._released(session, session.sent)
        return frames

    def _released(self, session: Session, seq: int) -> None:
        if session.acknowledged(seq) and self.journal is not None:
            self.journal.append(("a", session.url, seq))

    def _acknowledged(self, state: ConnState, msg: Message) -> None:
        """``update {"ack": n}`` from the runtime: it has every numbered message up to ``n`` (no answer)."""
        session = state.session
        if session is None or not state.ack:
            self.counters["invalid"] += 1
            return
        self.counters["acks_received"] += 1
        seq = (msg.body or {})["ack"]
        if seq > session.sent:
            self.counters["invalid"] += 1
            seq = session.sent
        self._released(session, seq)

    def _authenticated(self, state: ConnState, msg: Message, out: list[Action]) -> bool:
        if self._auth is None:
            return True
        token = (msg.body or {}).get("accessToken")
        if token is None:
            self.answers.error(state, msg, 401, "open: this node requires body.accessToken", out)
            return False
        if not isinstance(token, str):
            self.answers.error(state, msg, 400, "body.accessToken: expected a string", out)
            return False
        given = token.encode()
        # compare against every token so the time taken says nothing about which one nearly matched
        ok = False
        for accepted in self._auth:
            ok |= hmac.compare_digest(given, accepted)
        if not ok:
            self.answers.error(state, msg, 403, "open: body.accessToken is not accepted by this node", out)
        return ok

    def _close(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        session = state.session
        if session is None:
            self.answers.error(state, msg, 404, "close: no session on this connection", out)
            return
        sender = msg.from_
        if not (sender == session.runtime_url or sender.startswith(session.runtime_url + "/")):
            text = f"close: {sender} is not within this session's runtime {session.runtime_url}"
            self.answers.error(state, msg, 403, text, out)
            return
        self.answers.reply(state, response(msg, 200), out)
        self._end(session, "closed", out)
        self.answers.close(state, CloseCode.NORMAL_CLOSURE, "session closed", out)

    def detach(self, session: Session, now: float, out: list[Action]) -> None:
        """The session's socket is gone (or going): it waits ``session_grace`` seconds for a re-open."""
        session.conn = None
        if self.session_grace <= 0:
            self._end(session, "expired", out)
            return
        self.sessions.schedule(session, now + self.session_grace)
        if self.remote is not None:
            self.remote.session_changed(session, "detached")

    def _end(self, session: Session, reason: str, out: list[Action]) -> None:
        """Free everything the session holds; its connection (if any) stays open but session-less."""
        self.sessions.remove(session)
        freed = self.addresses.release(session)
        self.subscriptions.release(session)
        if session.conn is not None:
            state = self.conns.get(session.conn)
            if state is not None and state.session is session:
                state.session = None
            session.conn = None
        session.deadline = None
        self.counters[f"sessions_{reason}"] += 1
        if self.remote is not None:
            self.remote.session_changed(session, "ended")
        out.append(SessionEnded(session.url, session.runtime_url, reason, freed))
        if session.unacked:  # numbered and never acknowledged: answered like the buffer
            session.buffer.extend(session.unacked)
            session.unacked.clear()
            session.unacked_bytes = 0
        if session.buffer:  # after the tables are freed: no answer can route back into this session
            self._answer_buffer(session, _ENDED[reason], out)

    # -- sessions moving between the nodes of a cluster ------------------------------------------------

    def adopt(self, state: ConnState, msg: Message, session: Session, out: list[Action]) -> None:
        """Install ``session`` (claimed from another node, its buffer filled) on ``state``'s connection."""
        if state.closing or state.session is not None or self.sessions.get(session.url) is not None:
            self.answers.error(state, msg, 409, f"re-open: {session.url} is already held here", out)
            return
        self.sessions.add(session)
        owner = {address: session for address in session.addresses}
        owner.update((address, session) for address in session.bound)
        self.addresses.install(owner)
        self.subscriptions.install((session,))
        session.conn = state.conn
        state.session = session
        self.counters["sessions_reopened"] += 1
        if self.remote is not None:
            self.remote.session_changed(session, "attached")
        self._granted(state, msg, session, out)

    def hand_off(self, url: str, out: list[Action]) -> list[bytes]:
        """Another node took ``url`` over: drop it here (its cluster state stays), close its connection
        with 4000, and return what was buffered for it, for the new owner."""
        session = self.sessions.get(url)
        if session is None:
            return []
        self.sessions.remove(session)
        owner = self.addresses
        for address in (*session.addresses, *session.bound):
            if owner.owner(address) is session:
                owner.forget(address)
        self.subscriptions.release(session)
        conn = session.conn
        session.conn = None
        session.deadline = None
        if conn is not None:
            state = self.conns.get(conn)
            if state is not None and state.session is session:
                state.session = None
                self.answers.close(state, CLOSE_SESSION_TAKEN_OVER, "session re-opened on another node", out)
        return session.take_buffer()

    # -- what was buffered for a session that ends -------------------------------------------------------

    def _answer_buffer(self, session: Session, reason: str, out: list[Action]) -> None:
        """A session ends with messages still buffered: ``410`` to the sender of each, never silence.

        Fan-out copies are answered too (the publisher learns which subscriber missed its update);
        responses are discarded, as a response is never answered (counted in ``buffer_discarded``).
        """
        for data in session.take_buffer():
            try:
                msg: Message | None = decode(data, max_size=len(data))
            except MessageError:
                msg = None
            if msg is None or msg.type == "response":
                self.counters["buffer_discarded"] += 1
                continue
            self.counters["buffer_answered"] += 1
            text = f"{msg.to}: its session {session.url} {reason} before this message could be delivered"
            self.deliver(encode(response(msg, 410, text)), msg.from_, out)

    def deliver(self, data: bytes, to: str, out: list[Action]) -> None:
        """Route one node-made response (no sender session): point to point, buffered if detached."""
        target = self.addresses.owner(to) or self.sessions.route(to)
        if target is None:
            if self.remote is not None and self.remote.forward(to, data):
                return
            self.counters["responses_dropped"] += 1
        elif target.ack:
            if acks.number(target, data, out, self.journal, (self.buffer_messages, self.buffer_bytes)):
                self.counters["delivered"] += 1
            else:
                self.counters["buffer_full"] += 1
                self.counters["responses_dropped"] += 1
        elif target.conn is not None:
            self.counters["delivered"] += 1
            out.append(Send(target.conn, data))
        elif target.keep(data, self.buffer_messages, self.buffer_bytes):
            self.counters["buffered"] += 1
        else:
            self.counters["buffer_full"] += 1
            self.counters["responses_dropped"] += 1

    # -- graceful stop (drain extension) --------------------------------------------------------------

    def begin_drain(self, out: list[Action]) -> None:
        if self.draining:
            return
        self.draining = True
        for state in self.conns.values():
            if state.drain and state.session is not None and not state.closing:
                self._notify_draining(state, out)

    def close_plain(self, now: float, out: list[Action]) -> None:
        for state in list(self.conns.values()):
            if not state.drain and not state.closing:
                self._shut(state, now, out)

    def finish_drain(self, now: float, out: list[Action]) -> None:
        self.counters["drain_timeouts"] += len(self.awaiting)
        self.awaiting.clear()
        for state in list(self.conns.values()):
            if not state.closing:
                self._shut(state, now, out)

    def _notify_draining(self, state: ConnState, out: list[Action]) -> None:
        session = state.session
        assert session is not None
        self.awaiting.add(state.conn)
        self.counters["drain_notices"] += 1
        notice = Message(
            id=next(self._notice_ids), type="update", from_=SESSION_URL, to=session.url, body={"value": "draining"}
        )
        out.append(Send(state.conn, encode(notice)))

    def _shut(self, state: ConnState, now: float, out: list[Action]) -> None:
        session = state.session
        if session is not None and session.conn is state.conn:
            state.session = None
            self.detach(session, now, out)
        self.answers.close(state, CloseCode.GOING_AWAY, _SHUTDOWN_REASON, out)

    def _drained(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        """``update`` ``{value: "drained"}`` to ``mn:/session``: the drain client's last frame (no answer)."""
        value = (msg.body or {}).get("value")
        if not isinstance(value, str) or value.lower() != "drained":
            text = f"body.value: {SESSION_URL} accepts an update only with value 'drained' (drain extension)"
            self.answers.error(state, msg, 400, text, out)
            return
        session = state.session
        if session is None or not state.drain:
            text = (
                'drained: this connection did not negotiate the drain extension (send "drain": true in open or re-open)'
            )
            self.answers.error(state, msg, 409, text, out)
            return
        if not self.draining:
            self.answers.error(state, msg, 409, "drained: this message node is not draining", out)
            return
        if state.conn in self.awaiting:
            self.awaiting.discard(state.conn)
            self.counters["drained"] += 1
            out.append(Drained(state.conn, len(self.awaiting)))
