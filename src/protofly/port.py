"""A stub's port: the bus listener at the stub's URL and the bounded queue of messages waiting for it.

Messages for a domain arrive here whatever state its stub is in.  The lifecycle decides whether each is
forwarded, held or refused; the port does the holding (in arrival order, at most ``limit``) and the
answering, so that no message is ever dropped silently: a full queue or a full channel gets its sender a
``503`` at once, a failed or unloaded stub gets every held message answered with the failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from protofly.bus import MessageBus
from protofly.message import Message

__all__ = ["Sink", "StubPort"]


class Sink(Protocol):
    """Where a live stub's messages go: the sandbox component (``post`` is False when its channel is full)."""

    def post(self, msg: Message) -> bool: ...


class StubPort:
    """The held messages of one domain's stub, and the one place that answers them when they cannot go."""

    __slots__ = ("_bus", "_queue", "domain", "limit")

    def __init__(self, bus: MessageBus, domain: str, limit: int) -> None:
        self._bus = bus
        self._queue: deque[Message] = deque()
        self.domain = domain
        self.limit = limit

    def __len__(self) -> int:
        return len(self._queue)

    def hold(self, msg: Message) -> None:
        """Keep ``msg`` until the stub is live; a full queue answers ``503`` now."""
        if len(self._queue) >= self.limit:
            self._bus.reply_error(msg, 503, f"stub for {self.domain} is not live and its queue is full")
            return
        self._queue.append(msg)

    def forward(self, sink: Sink, msg: Message) -> None:
        if not sink.post(msg):
            self.forward_failed(msg)

    def forward_failed(self, msg: Message) -> None:
        """The live stub's channel did not take ``msg``: its sender learns so now."""
        self._bus.reply_error(msg, 503, f"stub for {self.domain} is not taking messages (its channel is full)")

    def flush(self, sink: Sink, still_live: Callable[[], bool]) -> None:
        """Forward the held messages in order, while the stub stays live."""
        queue = self._queue
        while queue and still_live():
            self.forward(sink, queue.popleft())

    def answer_all(self, code: int, description: str) -> None:
        """Answer every held message with an error (a failed deployment, an unload, a crash loop)."""
        queue = self._queue
        while queue:
            self._bus.reply_error(queue.popleft(), code, description)

    def reject(self, msg: Message, code: int, description: str) -> None:
        self._bus.reply_error(msg, code, description)
