"""What a cluster's shell (``msgnode/cluster/``) calls on the core: allocations, claims, remote deliveries.

A mixin of :class:`~protofly.msgnode.core.MessageNodeCore`, apart from the single-node protocol: a
clustered node's shell reports here what the rest of the cluster decided (an allocation granted, a
session claimed or handed off) and what it forwarded (a message or a publication for a local session),
and gets actions back like from every other core event.
"""

from __future__ import annotations

from collections.abc import Hashable

from protofly.message import Message, MessageError, decode, encode, response
from protofly.msgnode.actions import Action, Refused, Send
from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.answers import Answers
from protofly.msgnode.session import Session, SessionTable
from protofly.msgnode.session_manager import SessionManager
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = ["ClusterCalls"]


class ClusterCalls:
    """The core's calls back from a cluster's shell (each returns the actions to carry out)."""

    counters: dict[str, int]
    sessions: SessionTable
    addresses: AddressTable
    subscriptions: SubscriptionTable
    manager: SessionManager
    _answers: Answers

    def allocated(
        self, conn: Hashable, msg: Message, addresses: list[str], key: str | None, refused: Refused | None
    ) -> list[Action]:
        """The cluster took ``addresses`` (and ``key``) for the session of ``conn``, or ``refused`` says why not."""
        out: list[Action] = []
        state = self.manager.conns.get(conn)
        session = None if state is None else state.session
        if state is None or state.closing:
            return out
        if refused is None and session is None:
            refused = Refused(410, "the session went away while its addresses were allocated")
        if refused is not None or session is None:
            assert refused is not None
            self._answers.error(state, msg, refused.code, refused.description, out)
            return out
        value = self.addresses.grant(session, addresses, key)
        if self.manager.remote is not None:
            self.manager.remote.session_changed(session, "updated")
        self._answers.reply(state, response(msg, 200, value=value), out)
        return out

    def adopt(self, conn: Hashable, msg: Message, session: Session, frames: list[bytes]) -> list[Action]:
        """A ``re-open`` claimed ``session`` from the cluster: hold it here, ``200``, then replay ``frames``."""
        out: list[Action] = []
        state = self.manager.conns.get(conn)
        if state is None:
            return out
        session.buffer = list(frames)
        session.buffer_bytes = sum(len(frame) for frame in frames)
        self.counters["sessions_claimed"] += 1
        self.manager.adopt(state, msg, session, out)
        return out

    def claim_failed(self, conn: Hashable, msg: Message, code: int, text: str) -> list[Action]:
        out: list[Action] = []
        state = self.manager.conns.get(conn)
        if state is not None and not state.closing:
            self._answers.error(state, msg, code, text, out)
        return out

    def hand_off(self, url: str) -> tuple[list[Action], list[bytes]]:
        """Another node claimed session ``url``: let it go (close 4000) and return its buffered frames."""
        out: list[Action] = []
        frames = self.manager.hand_off(url, out)
        if frames or out:
            self.counters["sessions_handed_off"] += 1
        return out, frames

    def remote_deliver(self, url: str, data: bytes) -> list[Action] | None:
        """A message for local session ``url`` came from another node; None when that session is not here."""
        session = self.sessions.get(url)
        if session is None:
            return None
        self.counters["remote_in"] += 1
        out: list[Action] = []
        if session.conn is not None:
            self.counters["delivered"] += 1
            out.append(Send(session.conn, data))
        elif session.keep(data, self.manager.buffer_messages, self.manager.buffer_bytes):
            self.counters["buffered"] += 1
        else:
            self.counters["buffer_full"] += 1
            return self.undeliverable(data, 503, f"the session {url} is detached and its buffer is full")
        return out

    def remote_fan_out(self, resource: str, data: bytes) -> list[Action]:
        """A publication to ``resource`` came from another node: hand it to this node's subscribers."""
        out: list[Action] = []
        subscribers = self.subscriptions.subscribers(resource)
        self.counters["remote_in"] += 1
        if not subscribers:
            return out
        delivered = 0
        for session in subscribers:
            conn = session.conn
            if conn is None:
                if session.keep(data, self.manager.buffer_messages, self.manager.buffer_bytes):
                    self.counters["buffered"] += 1
                else:
                    self.counters["buffer_full"] += 1
            else:
                out.append(Send(conn, data))
                delivered += 1
        self.counters["fanout_deliveries"] += delivered
        return out

    def undeliverable(self, data: bytes, code: int, text: str) -> list[Action]:
        """A message this node accepted could not be delivered by the cluster: ``code`` to its sender."""
        out: list[Action] = []
        try:
            msg = decode(data, max_size=max(len(data), self.manager.max_frame))
        except MessageError:
            self.counters["responses_dropped"] += 1
            return out
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return out
        self.counters["errors_sent"] += 1
        self.manager.deliver(encode(response(msg, code, text)), msg.from_, out)
        return out
