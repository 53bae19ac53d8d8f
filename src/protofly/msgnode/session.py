"""Sessions: what one runtime owns on the node, and the table that finds a session and expires it.

A :class:`Session` outlives its WebSocket: while detached (socket gone) it keeps its addresses,
subscriptions and a bounded buffer of the messages routed to it, until a ``re-open`` binds it to a new
connection or its grace period ends.  :class:`SessionTable` indexes sessions by URL and by runtime URL and
keeps the deadlines of detached ones in a heap, so expiry costs O(log n) and needs no clock of its own.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["ConnState", "Session", "SessionTable"]


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
    #: Acknowledged delivery (``docs/msgnode.md``): the last connection negotiated ``"ack": true``.
    ack: bool = False
    #: The highest sequence number accepted from the runtime (what arrives again is a duplicate).
    received: int = 0
    #: The sequence number of the last message the node numbered for this session.
    sent: int = 0
    #: Messages numbered for the runtime and not acknowledged by it yet, oldest first: the numbers
    #: ``sent - len(unacked) + 1`` ... ``sent`` (consecutive; see :meth:`numbered`).  Plain bytes, no
    #: ``(seq, data)`` tuples: they live until the runtime's ``ack`` and the garbage collector would
    #: traverse every one of them again and again.  Connected or not, they stay here until the runtime's
    #: ``ack`` (a re-open replays them).
    unacked: deque[bytes] = field(default_factory=deque)
    unacked_bytes: int = 0

    def number(self, data: bytes, max_messages: int, max_bytes: int) -> int:
        """Number ``data`` and keep it until acknowledged; 0 (nothing kept) when the window is full."""
        size = len(data)
        if len(self.unacked) >= max_messages or self.unacked_bytes + size > max_bytes:
            return 0
        self.sent += 1
        self.unacked.append(data)
        self.unacked_bytes += size
        return self.sent

    def numbered(self) -> Iterator[tuple[int, bytes]]:
        """The unacknowledged messages with their numbers, oldest first."""
        return enumerate(self.unacked, self.sent - len(self.unacked) + 1)

    def acknowledged(self, seq: int) -> int:
        """The runtime has everything up to ``seq``: forget it; returns how many messages were released."""
        unacked = self.unacked
        released = min(seq - (self.sent - len(unacked)), len(unacked))
        if released <= 0:
            return 0
        if released == len(unacked):
            unacked.clear()
            self.unacked_bytes = 0
            return released
        size = 0
        popleft = unacked.popleft
        for _ in range(released):
            size += len(popleft())
        self.unacked_bytes -= size
        return released

    def keep(self, data: bytes, max_messages: int, max_bytes: int) -> bool:
        """Buffer ``data`` for the re-open; False (nothing kept) when the buffer is full."""
        size = len(data)
        if len(self.buffer) >= max_messages or self.buffer_bytes + size > max_bytes:
            return False
        self.buffer.append(data)
        self.buffer_bytes += size
        return True

    def take_buffer(self) -> list[bytes]:
        """Empty the buffer and return what it held, oldest first."""
        frames, self.buffer, self.buffer_bytes = self.buffer, [], 0
        return frames


@dataclass(eq=False, slots=True)
class ConnState:
    """What the core knows of one connection (the shell's object is only its key)."""

    conn: Hashable
    session: Session | None = None
    batch: bool = False
    #: The drain extension was granted on this connection.
    drain: bool = False
    #: The acknowledged-delivery extension was granted on this connection (numbered frames both ways).
    ack: bool = False
    #: A Close was issued: frames still arriving before the socket goes are ignored (and counted).
    closing: bool = False
    #: Numbered messages (and their bytes) received since the last ack the core asked for at once: at
    #: ``ack_every`` (or ``ack_every_bytes``) the next ack is not delayed, so the client's window never fills.
    unacked_in: int = 0
    unacked_in_bytes: int = 0


class SessionTable:
    """Sessions by URL (``<runtimeURL>/<token>``) and by runtime URL, with the deadlines of detached ones."""

    __slots__ = ("_by_runtime", "_by_url", "_deadlines", "_seq")

    def __init__(self) -> None:
        self._by_url: dict[str, Session] = {}
        self._by_runtime: dict[str, Session] = {}
        #: (deadline, tie-breaker, session); stale entries (re-opened, ended) are skipped when popped.
        self._deadlines: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._by_url)

    def __iter__(self) -> Iterator[Session]:
        return iter(self._by_url.values())

    def get(self, url: str) -> Session | None:
        return self._by_url.get(url)

    def of_runtime(self, runtime_url: str) -> Session | None:
        return self._by_runtime.get(runtime_url)

    def add(self, session: Session) -> None:
        self._by_url[session.url] = session
        self._by_runtime[session.runtime_url] = session

    def remove(self, session: Session) -> None:
        del self._by_url[session.url]
        if self._by_runtime.get(session.runtime_url) is session:
            del self._by_runtime[session.runtime_url]

    def install(self, sessions: Iterable[Session]) -> None:
        """Add restored (already checked) sessions; the caller makes sure the table was empty."""
        for session in sessions:
            self.add(session)

    def route(self, to: str) -> Session | None:
        """The session whose runtime URL is ``to`` or a prefix of it ending at a ``/``."""
        by_runtime = self._by_runtime
        session = by_runtime.get(to)
        end = to.rfind("/")
        while session is None and end > 0:
            session = by_runtime.get(to[:end])
            end = to.rfind("/", 0, end)
        return session

    # -- deadlines of detached sessions -------------------------------------------------------------

    def schedule(self, session: Session, deadline: float) -> None:
        session.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._seq), session))

    def _due(self, when: float, session: Session) -> bool:
        return session.deadline == when and session.conn is None and self._by_url.get(session.url) is session

    def next_deadline(self) -> float | None:
        """The earliest deadline still in force, or None (stale heap entries are dropped on the way)."""
        heap = self._deadlines
        while heap:
            when, _, session = heap[0]
            if self._due(when, session):
                return when
            heapq.heappop(heap)
        return None

    def expired(self, now: float) -> Iterator[Session]:
        """Take the detached sessions whose deadline is ``now`` or earlier off the heap, one at a time.

        A generator on purpose: the caller ends each session before the next is checked, so a session
        with two heap entries (detached twice at the same time) is yielded once.
        """
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            when, _, session = heapq.heappop(heap)
            if self._due(when, session):
                yield session
