"""What the sans-I/O core asks its shell to do (the actions), and the close codes it uses.

Every core event returns a list of these values; the shell (``server.py``) carries them out in order.
They are plain slotted dataclasses: the core builds thousands per second, and a test compares them directly.

Standard close codes are ``websockets``' :class:`~websockets.frames.CloseCode` names; the one code of the
application range (4000-4999, RFC 6455 §7.4.2) that this node adds is :data:`CLOSE_SESSION_TAKEN_OVER`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import msgspec
from websockets.frames import CloseCode

__all__ = [
    "CLOSE_SESSION_TAKEN_OVER",
    "Ack",
    "Action",
    "Allocate",
    "Claim",
    "Close",
    "CloseCode",
    "Drained",
    "EnableBatch",
    "Refused",
    "Replay",
    "Send",
    "SessionEnded",
    "close_reason",
]

#: Application close code: the session was re-opened from another connection, which now owns it.  The
#: old connection is closed with it so that its stub reports why (and does not re-open in a loop).
CLOSE_SESSION_TAKEN_OVER = 4000

_CLOSE_REASON_MAX = 120  # RFC 6455 allows 123 bytes of reason; keep a margin


@dataclass(slots=True)
class Send:
    """Write ``data`` (one encoded JSON message) to ``conn``; the shell frames (or packs) it."""

    conn: Hashable
    data: bytes | memoryview | msgspec.Raw


@dataclass(slots=True)
class Ack(Send):
    """An ``ack`` (acknowledged delivery) for ``conn``: cumulative, so the shell keeps only the last one.

    Acks are not written one per frame received: the shell sends the newest of each connection with that
    connection's next frames, after the turn's journal records are on disk.  ``delayed`` (the core's
    decision, see ``MessageNodeCore.ack_every``): the ack may wait up to the shell's ``ack_delay`` for data
    going to ``conn`` to ride along with (TCP's delayed ACK), instead of waking the peer for it alone.
    """

    delayed: bool = False


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


@dataclass(slots=True)
class Allocate:
    """Clustered node only: make ``addresses`` (and ``key``) owned by ``session`` across the cluster.

    The shell creates them (create-if-absent) in the shared address table, then calls
    :meth:`~protofly.msgnode.core.MessageNodeCore.allocated`, which answers the request.
    """

    conn: Hashable
    msg: Any
    session: str
    addresses: list[str]
    key: str | None


@dataclass(slots=True)
class Claim:
    """Clustered node only: ``re-open`` of a session this node does not hold; the shell claims it from the
    cluster and calls :meth:`~protofly.msgnode.core.MessageNodeCore.adopt` (or ``claim_failed``)."""

    conn: Hashable
    msg: Any


Action = Send | Close | EnableBatch | SessionEnded | Replay | Drained | Allocate | Claim


class Refused(Exception):
    """A request a table cannot carry out; the core answers its sender ``code`` with this text.

    The tables (addresses, subscriptions) raise it instead of building responses, so that every answer is
    made in one place (the core), which also knows that a ``response`` is never answered.
    """

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def close_reason(text: str) -> str:
    """``text`` cut (on a character boundary) to what fits in a close frame."""
    encoded = text.encode()
    if len(encoded) <= _CLOSE_REASON_MAX:
        return text
    return encoded[: _CLOSE_REASON_MAX - 3].decode(errors="ignore") + "..."
