"""The runtime's end of one sandbox host's channel: frames both ways, numbered control requests, fair reading.

:mod:`~protofly.sandbox.channel` is the framing without I/O; this is the asyncio protocol that carries it
over the host's socketpair, apart from :class:`~protofly.sandbox.process_component.ProcessComponent`, which
decides what each message means (the stub's traffic through the guard, the host's control notices) and
owns the process.  What it does:

* **sending** -- everything sent in one event-loop iteration leaves as one frame and one system call;
  :attr:`HostChannel.queued_bytes` is what the host has not read yet (the component refuses messages
  beyond its high-water mark);
* **control requests** -- numbered, each waited for with a timeout, all failed at once when the channel or
  the process ends;
* **reading** -- up to :data:`READ_CHUNK` bytes per callback, and at most :data:`EVENTS_PER_TURN` messages handed
  on per loop turn with the channel paused meanwhile, so one flooding stub cannot hold the loop while other
  stubs' messages wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import msgspec

from protofly.message import Message, MessageError
from protofly.sandbox import SandboxError
from protofly.sandbox.channel import FrameDecoder, FrameEncoder, FrameError

__all__ = ["EVENTS_PER_TURN", "READ_CHUNK", "Events", "HostChannel"]

#: Bytes read from a stub's channel per event-loop callback (asyncio's own read size).  Fairness does not
#: come from a small read but from :data:`EVENTS_PER_TURN` (a big read is handed on over several turns, the
#: channel paused): 16 KiB reads cost a loop turn and a partial frame's copy per 10 kB message (one-way
#: 10 kB at 19-22k msg/s against 27k), while a 2,000,000-message flood keeps another stub's round trip
#: at 2.0 ms p99 with 256 KiB reads (``bench/hostile.py``, ``docs/benchmarks.md``).
READ_CHUNK = 256 * 1024
#: Messages from one stub handled per event-loop turn (the rest wait for the next turn, the channel paused).
EVENTS_PER_TURN = 256

#: What the channel hands on: the messages and frame errors read, in order.
Events = list[Message | FrameError]


class HostChannel(asyncio.BufferedProtocol):
    """One host's channel: ``on_events`` gets what is read, ``on_lost`` is told once when it closes.

    ``counters`` gets ``bytes_to_stub`` and ``bytes_from_stub`` (the component's counters, for metrics).
    """

    def __init__(
        self,
        max_frame: int,
        counters: dict[str, int],
        on_events: Callable[[Events], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._counters = counters
        self._on_events = on_events
        self._on_lost = on_lost
        self._decoder = FrameDecoder(max_frame)
        self._encoder = FrameEncoder(max_frame)
        self._view = memoryview(bytearray(READ_CHUNK))
        self._flush_scheduled = False
        self._waiters: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        #: Messages read and not handed on yet (a big batch frame is handed on over several turns).
        self._backlog: deque[Message | FrameError] = deque()
        self._backlog_scheduled = False

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._counters["bytes_from_stub"] += nbytes
        events = self._decoder.feed(self._view[:nbytes])  # the decoder copies what it keeps
        if len(events) <= EVENTS_PER_TURN and not self._backlog:
            self._on_events(events)
            return
        # One frame may be a batch of thousands (a flooding stub): hand them on a turn at a time, and read
        # nothing more from this host until they are done, so other stubs' messages wait one turn at most.
        self._backlog.extend(events)
        if not self._backlog_scheduled:
            self._backlog_scheduled = True
            if self.transport is not None:
                self.transport.pause_reading()
            self._loop.call_soon(self._next_turn)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()  # it fails the waiting requests, saying why

    def _next_turn(self) -> None:
        backlog = self._backlog
        self._on_events([backlog.popleft() for _ in range(min(len(backlog), EVENTS_PER_TURN))])
        if backlog:
            self._loop.call_soon(self._next_turn)
            return
        self._backlog_scheduled = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # -- sending --------------------------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Bytes sent and not yet read by the host (the transport's buffer and this iteration's frame);
        -1 when the channel is closed."""
        transport = self.transport
        if transport is None:
            return -1
        return transport.get_write_buffer_size() + self._encoder.pending_bytes

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for this iteration's frame; :class:`MessageError` if it cannot be encoded or is too big."""
        try:
            self._encoder.add(msg)
        except (TypeError, msgspec.EncodeError):
            raise MessageError("body: not JSON-serialisable") from None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._encoder.flush()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            self._counters["bytes_to_stub"] += len(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- control requests -----------------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def request(self, msg: Message, timeout: float, why_closed: str) -> Message:
        """Send a control request numbered by :meth:`new_id` and wait for its answer (``TimeoutError``)."""
        if self.transport is None:
            raise SandboxError(f"the sandbox channel is closed ({why_closed})")
        msg_id = msg.id
        assert isinstance(msg_id, int)  # control requests are numbered by new_id
        future: asyncio.Future[Message] = self._loop.create_future()
        self._waiters[msg_id] = future
        try:
            self.send(msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(msg_id, None)

    async def try_request(self, msg: Message, deadline: float) -> None:
        """:meth:`request` until ``deadline`` (loop time), its failure ignored (a polite removal step)."""
        remaining = deadline - self._loop.time()
        if remaining <= 0 or self.transport is None:
            return
        with contextlib.suppress(TimeoutError, SandboxError, MessageError):
            await self.request(msg, remaining, "closing")

    def answered(self, msg: Message) -> None:
        """A response on the control side: it settles the request of that number, if one waits."""
        future = self._waiters.get(msg.id) if isinstance(msg.id, int) else None
        if future is not None and not future.done():
            future.set_result(msg)

    def fail_waiters(self, reason: str) -> None:
        """Every waiting control request fails with :class:`SandboxError` (``reason``)."""
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(SandboxError(reason))
