"""The frame writer: one WebSocket's bounded outgoing queue, written in coalesced system calls.

Messages for one connection are queued and written by one callback per loop iteration, all frames of that
iteration in one ``transport.writelines`` call (aiohttp's own writer would make one system call per
frame).  Frames are written on the transport directly: server frames are unmasked and compression is never
negotiated, so a frame is just a 2/4/10-byte header and the message bytes.

Acknowledgements (``Ack``) are cumulative: the writer keeps only the newest one per connection and writes
it with the next batch of frames, so a turn that reads twenty frames from a runtime answers with one
``ack``.  An ack the core marks ``delayed`` waits up to ``ack_delay`` (default 20 ms) for a frame to this
peer to ride with -- in a request/reply, the reply -- and is written alone only after that (TCP's delayed
ACK): an ack alone costs the peer's process a wake-up for nothing.  ``barrier`` (the node's durable
state) is called before any byte is handed to the transport: it writes the turn's journal records first
-- group commit -- so nothing leaves the node, neither an ``ack`` nor a message, for something a
restarted node would not know.

Flow control: the queue is bounded in messages and bytes; while the socket's buffer is over its high water
mark nothing more is written, and a consumer whose queue overflows (or that makes no progress for
``write_timeout`` seconds) is disconnected with close code 1013 so the node's memory stays flat.  A
re-opened session's buffered messages (:meth:`FrameWriter.replay`) are queued on top of that limit.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from aiohttp import web

from protofly.log import get_logger
from protofly.msgnode.acks import DEFAULT_ACK_DELAY
from protofly.msgnode.actions import CloseCode
from protofly.tasks import TaskSet

__all__ = ["FrameWriter", "text_header"]

#: Bytes (or messages) queued for one connection that are written at once instead of at the end of the
#: loop iteration; also the most handed to the transport per write call.
_WRITE_CHUNK = 256 << 10
_WRITE_BATCH = 1024
#: Largest JSON-array frame the node packs: beyond a few kB packing saves nothing and costs latency.
_PACK_LIMIT = 64 << 10

_log = get_logger("protofly.msgnode")

_SMALL_HEADERS = [bytes((0x81, n)) for n in range(126)]
_HEADER16 = struct.Struct("!BBH").pack
_HEADER64 = struct.Struct("!BBQ").pack


def text_header(length: int) -> bytes:
    """Header of one final, unmasked text frame (RFC 6455 §5.2)."""
    if length < 126:
        return _SMALL_HEADERS[length]
    if length < 65536:
        return _HEADER16(0x81, 126, length)
    return _HEADER64(0x81, 127, length)


class FrameWriter:
    """One WebSocket: its bounded outgoing queue and the writer that coalesces it.

    It is also the connection object the core knows (an opaque hashable key).  ``stats`` is the node's I/O
    counter dict; ``tasks`` the node's task set (the drain wait and the close run there).
    """

    __slots__ = (
        "_ack",
        "_ack_due",
        "_ack_timer",
        "_barrier",
        "_drain_task",
        "_flush_handle",
        "_loop",
        "_on_slow",
        "_request",
        "_stats",
        "_tasks",
        "ack_delay",
        "batch_frame",
        "close_timeout",
        "closing",
        "limit_bytes",
        "limit_messages",
        "peer",
        "pending",
        "pending_bytes",
        "send_queue",
        "send_queue_bytes",
        "write_timeout",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        *,
        stats: dict[str, int],
        tasks: TaskSet,
        send_queue: int,
        send_queue_bytes: int,
        write_timeout: float,
        close_timeout: float,
        on_slow: Callable[[FrameWriter, list[Any]], None] | None = None,
        barrier: Callable[[], None] | None = None,
        ack_delay: float = DEFAULT_ACK_DELAY,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        #: Told what was still queued when this connection is cut off as a slow consumer (the node keeps it).
        self._on_slow = on_slow
        self._request = request
        self._stats = stats
        self._tasks = tasks
        self.ws = ws
        self.peer = request.remote
        self.send_queue = send_queue
        self.send_queue_bytes = send_queue_bytes
        self.write_timeout = write_timeout
        self.close_timeout = close_timeout
        self.pending: list[Any] = []
        self.pending_bytes = 0
        #: 0: one message per frame; else the largest JSON-array frame this peer accepts.
        self.batch_frame = 0
        self.closing = False
        #: The queue's limits: the node's, raised by a replay until the queue has been written out.
        self.limit_messages = send_queue
        self.limit_bytes = send_queue_bytes
        self._flush_handle: asyncio.Handle | None = None
        self._drain_task: asyncio.Task[None] | None = None
        #: Called before anything is written (the node's journal group commit).
        self._barrier = barrier
        #: The newest ``ack`` not written yet (an older one is replaced: acks are cumulative).
        self._ack: bytes | None = None
        #: Delayed acks (``Ack.delayed``): how long one may wait for a frame to ride with; it is written
        #: alone only once ``_ack_due`` (not delayed, or ``_ack_timer`` fired).  0: never delayed.
        self.ack_delay = ack_delay
        self._ack_due = False
        self._ack_timer: asyncio.TimerHandle | None = None

    # -- queueing -----------------------------------------------------------------------------------

    def send(self, data: Any) -> None:
        if self.closing:
            self._stats["dropped_closing"] += 1
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self._drain_task is None:
            if self.pending_bytes >= _WRITE_CHUNK or len(self.pending) >= _WRITE_BATCH:
                # a burst (many frames read in one go): write now rather than queue it all for later
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                self._flush()
            elif self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        if len(self.pending) > self.limit_messages or self.pending_bytes > self.limit_bytes:
            self._overflow()
        elif self.pending_bytes > self._stats["queue_peak_bytes"]:
            self._stats["queue_peak_bytes"] = self.pending_bytes

    def ack(self, data: bytes, delayed: bool = False) -> None:
        """Queue an ``ack``, replacing one not written yet; it goes out with the next frames to this peer.

        Not ``delayed``: this loop turn, alone if nothing else is written.  ``delayed``: with whatever data is
        written to this peer first (this turn's, or a reply's a moment later), or alone after ``ack_delay``
        -- in a request/reply the ack then costs the peer no wake-up of its own.
        """
        if self.closing:
            return
        self._ack = data
        if not delayed or self.ack_delay <= 0:
            self._ack_due = True
        elif not self._ack_due:
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(self.ack_delay, self._ack_expired)
            return  # data queued this turn has its flush scheduled already, and takes the ack along
        if self._flush_handle is None and self._drain_task is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _ack_expired(self) -> None:
        """No data went to this peer within ``ack_delay``: the delayed ack goes alone."""
        self._ack_timer = None
        self._ack_due = True
        if self._flush_handle is None and self._drain_task is None:
            self._flush()

    def replay(self, frames: list[bytes]) -> None:
        """Queue a re-opened session's buffered messages, raising the limits by as much.

        They were accepted while the session was detached; a reader that needs a while to take them in
        is not a slow consumer.  The limits fall back to the node's once the queue has been written out.
        """
        if self.closing:
            self._stats["dropped_closing"] += len(frames)
            return
        size = sum(map(len, frames))
        self.limit_messages += len(frames)
        self.limit_bytes += size
        self.pending.extend(frames)
        self.pending_bytes += size
        if self._drain_task is None:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush()

    def enable_batch(self, max_frame: int) -> None:
        """Write what is queued as plain frames first: the peer learns of batching from the 200 in it."""
        self._write(len(self.pending))
        self.batch_frame = min(max_frame, _PACK_LIMIT)

    # -- writing ------------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write everything queued, a chunk per call, until done or the socket's buffer is full."""
        self._flush_handle = None
        if self.closing:
            return
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self._discard()
            return
        protocol = self._request.protocol
        while self.pending and not protocol.writing_paused:
            self._write(self._chunk())
        if self._ack is not None and self._ack_due and not protocol.writing_paused:
            self._write(0)
        if (self.pending or (self._ack is not None and self._ack_due)) and self._drain_task is None:
            self._drain_task = self._tasks.spawn(self._drain())

    def _chunk(self) -> int:
        """How many queued messages make up the next write of about ``_WRITE_CHUNK`` bytes."""
        if self.pending_bytes <= _WRITE_CHUNK:
            return len(self.pending)
        size = 0
        for index, data in enumerate(self.pending):
            size += len(data)
            if size >= _WRITE_CHUNK:
                return index + 1
        return len(self.pending)

    def _write(self, count: int) -> None:
        """Frame the first ``count`` queued messages (and the pending ``ack``) and hand them over in one call."""
        ack = self._ack
        if count == 0 and ack is None:
            return
        if self._barrier is not None:
            self._barrier()
        transport = self._request.transport
        if count == len(self.pending):
            taken, size = self.pending, self.pending_bytes
            self.pending = []
        else:
            taken = self.pending[:count]
            del self.pending[:count]
            size = sum(len(d) for d in taken)
        self.pending_bytes -= size
        if not self.pending and self.limit_messages != self.send_queue:  # a replay is written out
            self.limit_messages = self.send_queue
            self.limit_bytes = self.send_queue_bytes
        if transport is None or transport.is_closing():
            return
        parts = self._frames(taken) if self.batch_frame and count > 1 else self._plain_frames(taken)
        if ack is not None:
            self._ack = None
            self._ack_due = False
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
            # first: a stub takes the ack (a saved state for its runtime) and the data in one pass, and its
            # runtime gets both in one channel frame
            parts[:0] = (text_header(len(ack)), ack)
            self._stats["frames_out"] += 1
        transport.writelines(parts)
        stats = self._stats
        stats["writes"] += 1
        stats["messages_out"] += count
        stats["bytes_out"] += size
        buffered = transport.get_write_buffer_size()
        if buffered > stats["transport_peak_bytes"]:
            stats["transport_peak_bytes"] = buffered

    def _plain_frames(self, messages: list[Any]) -> list[Any]:
        parts: list[Any] = []
        append = parts.append
        for data in messages:
            append(text_header(len(data)))
            append(data)
        self._stats["frames_out"] += len(messages)
        return parts

    def _frames(self, messages: list[Any]) -> list[Any]:
        """Pack messages into JSON-array frames of at most ``batch_frame`` bytes (batching extension)."""
        parts: list[Any] = []
        group: list[Any] = []
        size = 2
        limit = self.batch_frame
        for data in messages:
            if group and size + len(data) + 1 > limit:
                self._emit(parts, group)
                group = []
                size = 2
            group.append(data)
            size += len(data) + 1
        if group:
            self._emit(parts, group)
        return parts

    def _emit(self, parts: list[Any], group: list[Any]) -> None:
        if len(group) == 1:
            payload = group[0]
        else:
            payload = b"[" + b",".join(group) + b"]"
        parts.append(text_header(len(payload)))
        parts.append(payload)
        self._stats["frames_out"] += 1

    async def _drain(self) -> None:
        """Wait (bounded) for the socket buffer to fall below its low water mark, then write on."""
        try:
            await asyncio.wait_for(self._request.writer.drain(), timeout=self.write_timeout)
        except TimeoutError:
            self._drain_task = None
            self._slow(f"no write progress for {self.write_timeout} s")
            return
        except ConnectionError:
            self._drain_task = None
            self._discard()
            return
        self._drain_task = None
        self._flush()

    # -- closing ------------------------------------------------------------------------------------

    def _overflow(self) -> None:
        self._slow(f"send queue over {self.send_queue} messages or {self.send_queue_bytes} bytes")

    def _slow(self, why: str) -> None:
        self._stats["slow_consumers"] += 1
        _log.warning("slow consumer disconnected", peer=self.peer, reason=why, queued=len(self.pending))
        pending = self.pending
        self.pending = []
        self.pending_bytes = 0
        self.closing = True  # nothing more is queued here: the session is detached first
        if self._on_slow is not None:
            self._on_slow(self, pending)
        else:
            self._stats["dropped_closing"] += len(pending)
        self.closing = False
        # the close frame waits behind data the peer is not reading: give it a second, not close_timeout
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer: " + why, timeout=min(1.0, self.close_timeout))

    def _discard(self) -> None:
        self._ack = None
        self._ack_due = False
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._stats["dropped_closing"] += len(self.pending)
        self.pending = []
        self.pending_bytes = 0

    def close(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Write what is queued, then close with ``code`` (bounded: a stuck peer is aborted)."""
        if self.closing:
            return
        _log.info("closing connection", peer=self.peer, code=int(code), reason=reason)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.pending or self._ack is not None:
            self._write(len(self.pending))
        self.closing = True
        self._stats["closes_sent"] += 1
        self._tasks.spawn(self._close(int(code), reason, self.close_timeout if timeout is None else timeout))

    async def _close(self, code: int, reason: str, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), timeout=timeout)
        except (TimeoutError, ConnectionError):
            transport = self._request.transport
            if transport is not None:
                transport.abort()

    def finished(self) -> None:
        """The socket is gone: stop every callback and task of this connection."""
        self.closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self._discard()
