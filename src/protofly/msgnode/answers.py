"""Every answer the core makes: replies, error responses, the ``400`` to an invalid frame, closes.

One place, shared by the router and the session manager, so that the node's two rules about answers hold
everywhere: a ``response`` is never answered (two nodes could loop; it is counted and dropped), and a
frame with no sender to answer closes the connection (1007) instead.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protofly.message import Message, encode, response
from protofly.msgnode.actions import Action, Close, CloseCode, Send, close_reason
from protofly.msgnode.session import ConnState

__all__ = ["Answers"]


class Answers:
    """Builds answers into an action list and counts them in the core's ``counters``."""

    __slots__ = ("_counters",)

    def __init__(self, counters: dict[str, int]) -> None:
        self._counters = counters

    def reply(self, state: ConnState, msg: Message, out: list[Action]) -> None:
        out.append(Send(state.conn, encode(msg)))

    def close(self, state: ConnState, code: int, reason: str, out: list[Action]) -> None:
        """Close ``state``'s connection; frames it still sends are ignored from now on."""
        state.closing = True
        out.append(Close(state.conn, code, close_reason(reason)))

    def error(self, state: ConnState, msg: Message, code: int, description: str, out: list[Action]) -> None:
        """Answer a request with an error; a response is never answered (two nodes could loop)."""
        if msg.type == "response":
            self._counters["responses_dropped"] += 1
            return
        self._counters["errors_sent"] += 1
        out.append(Send(state.conn, encode(response(msg, code, description))))

    def not_found(self, state: ConnState, msg: Message, description: str, out: list[Action]) -> None:
        self._counters["not_found"] += 1
        self.error(state, msg, 404, description, out)

    def invalid(self, state: ConnState, raw: Any, text: str, out: list[Action]) -> None:
        """A frame that is not a valid message: answer 400 if a sender can be found, else close 1007."""
        self._counters["invalid"] += 1
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeError, RecursionError):  # invalid UTF-8 too: close 1007
            obj = None
        sender = obj.get("from") if isinstance(obj, dict) else None
        if not isinstance(sender, str) or not sender:
            self.close(state, CloseCode.INVALID_DATA, text, out)
            return
        kind = obj.get("type")
        if isinstance(kind, str) and kind.lower() == "response":
            self._counters["responses_dropped"] += 1
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
        self._counters["errors_sent"] += 1
        out.append(Send(state.conn, encode(reply)))
