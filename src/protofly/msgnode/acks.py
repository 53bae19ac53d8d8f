"""The acknowledged-delivery extension on the wire: numbered frames, ``ack`` messages, numbering a message.

A connection that asked ``"ack": true`` in ``open``/``re-open`` (and was granted it) numbers the messages
of its session in both directions:

* a *numbered frame* is a JSON array whose first element is the sequence number of the first message that
  follows: ``[17, {msg 17}, {msg 18}]``.  Session messages (``open``, ``ack``, ``drained`` ...) and the
  node's own answers to the connection travel unnumbered, as plain frames;
* each side acknowledges with an ``update`` carrying ``{"ack": n}`` (the node: from ``mn:/session`` to the
  session URL; the runtime: from the session URL to ``mn:/session``), meaning "I have everything up to
  ``n``";
* an ack rides with the data already going to that peer; otherwise it waits up to ``ack_delay``
  (default 20 ms) for some, and goes alone after that -- or at once when a quarter of the window has come
  unacknowledged since the last (``MessageNodeCore.ack_every``), so the sender never stalls;
* a message arriving again with a number already seen is a duplicate and is dropped (counted).

The session keeps what it numbered for the runtime until acknowledged (``Session.unacked``); the stub keeps
what it sent until acknowledged.  A ``re-open`` says ``"received": n`` and its ``200`` answers with the
node's own ``"received"``, so each side re-sends exactly what the other has not got.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protofly.msgnode.actions import Action, Send
from protofly.msgnode.session import Session

__all__ = ["DEFAULT_ACK_DELAY", "ack_message", "frame", "number", "split"]

#: Seconds an ack may wait for data going to the same peer before it is sent alone (delayed acks).
DEFAULT_ACK_DELAY = 0.02

_SESSION = b'"mn:/session"'


def frame(seq: int, data: bytes | memoryview) -> bytes:
    """One numbered message as a frame: ``[seq,<message>]``."""
    return b"[%d,%s]" % (seq, bytes(data))


def split(data: bytes) -> tuple[int, bytes] | None:
    """``[seq,m1,m2]`` -> ``(seq, b"[m1,m2]")``; None when ``data`` is not a numbered frame."""
    if data[:1] != b"[":
        return None
    comma = data.find(b",", 1, 32)
    if comma < 0:
        return None
    head = data[1:comma].strip()
    if not head.isdigit():
        return None
    return int(head), b"[" + data[comma + 1 :]


def ack_message(session_url: str, seq: int) -> bytes:
    """The node's ``ack`` to a session: everything up to ``seq`` is routed (and, if durable, journaled)."""
    return b'{"type":"update","from":%s,"to":%s,"body":{"ack":%d}}' % (_SESSION, msgspec.json.encode(session_url), seq)


def number(
    session: Session,
    data: bytes,
    out: list[Action],
    journal: list[Any] | None,
    limits: tuple[int, int],
) -> bool:
    """Number ``data`` for an ack session, journal it, and send it if the session is connected.

    False (nothing kept, nothing sent) when the session's window of unacknowledged messages is full: the
    caller answers the sender, so nothing is dropped silently.
    """
    seq = session.number(data, *limits)
    if not seq:
        return False
    if journal is not None:
        journal.append(("q", session.url, seq, data))
    if session.conn is not None:
        out.append(Send(session.conn, frame(seq, data)))
    return True
