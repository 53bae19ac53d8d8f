"""The node's own components besides ``mn:/session``: address allocation, subscriptions, the registries.

:class:`MessageNodeCore` routes a message addressed to one of these URLs here (routing precedence 1, see
``core.py``); each handler answers through :class:`~protofly.msgnode.answers.Answers` and, in a cluster,
tells the rest of the cluster what changed.  Kept apart from the core's routing, which is the hot path.
"""

from __future__ import annotations

from typing import Any

from protofly.message import Message, response
from protofly.msgnode.actions import Action, Allocate, Refused
from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.answers import Answers
from protofly.msgnode.session import ConnState, Session
from protofly.msgnode.session_manager import SESSION_URL, SessionManager
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = ["NodeComponents"]


class NodeComponents:
    """Handlers of the allocation, subscription and registry URLs of one node (``Handler`` signature)."""

    def __init__(
        self,
        addresses: AddressTable,
        subscriptions: SubscriptionTable,
        answers: Answers,
        manager: SessionManager,
        counters: dict[str, int],
    ) -> None:
        self.addresses = addresses
        self.subscriptions = subscriptions
        self.answers = answers
        self.manager = manager
        self.counters = counters

    def _session(self, state: ConnState, msg: Message, out: list[Action]) -> Session | None:
        """The sender's session for a node component, or None once the message is counted or answered."""
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return None
        if state.session is None:
            self.answers.error(
                state, msg, 403, f"no session on this connection: send 'open' to {SESSION_URL} first", out
            )
        return state.session

    def allocation(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        kind = msg.type
        session = self._session(state, msg, out)
        if session is None:
            return
        remote = self.manager.remote
        try:
            if kind == "create" and remote is not None:  # atomic across the cluster: the shell asks it
                addresses, key = self.addresses.plan(session, msg)
                out.append(Allocate(state.conn, msg, session.url, addresses, key))
                return
            if kind == "create":
                value: Any = self.addresses.allocate(session, msg)
            elif kind == "delete":
                value = {"deallocated": self.addresses.deallocate(session, msg)}
                if remote is not None:
                    remote.session_changed(session, "updated")
            else:
                raise Refused(405, f"type: {msg.to} accepts create and delete, not '{kind}'")
        except Refused as exc:
            self.answers.error(state, msg, exc.code, exc.description, out)
            return
        self.answers.reply(state, response(msg, 200, value=value), out)

    def subscription(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        kind = msg.type
        session = self._session(state, msg, out)
        if session is None:
            return
        try:
            if kind not in ("subscribe", "unsubscribe"):
                raise Refused(405, f"type: {msg.to} accepts subscribe and unsubscribe, not '{kind}'")
            self.subscriptions.handle(session, msg)
        except Refused as exc:
            self.answers.error(state, msg, exc.code, exc.description, out)
            return
        remote = self.manager.remote
        if remote is not None:
            remote.session_changed(session, "updated")
        self.answers.reply(state, response(msg, 200), out)

    def registry(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        if msg.type == "response":
            self.counters["responses_dropped"] += 1
            return
        self.answers.error(state, msg, 501, f"{msg.to}: no registry is connected to this message node", out)
