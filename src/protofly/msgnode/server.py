"""The message node's network shell: aiohttp WebSocket server around :class:`MessageNodeCore`.

Everything protocol-shaped lives in the core; this module only moves bytes and time:

* reading: aiohttp parses every frame of a socket read into its queue, and the per-connection loop
  hands them to the core one after the other without going back to the event loop in between
  (``decode_text=False``: the core gets the frame's bytes, never a ``str`` it would have to re-encode);
* writing: messages for one connection are queued and written by one callback per loop iteration, all
  frames of that iteration in one ``transport.writelines`` call (aiohttp's own writer would make one
  system call per frame).  Frames are written on the transport directly: server frames are unmasked and
  compression is never negotiated, so a frame is just a 2/4/10-byte header and the message bytes;
* flow control: the queue is bounded in messages and bytes; while the socket's buffer is over its high
  water mark nothing more is written, and a consumer whose queue overflows (or that makes no progress for
  ``write_timeout`` seconds) is disconnected with close code 1013 so the node's memory stays flat; a
  re-opened session's buffered messages (:class:`Replay`) are queued on top of that limit;
* time: a timer armed at the core's :meth:`~MessageNodeCore.next_deadline` expires detached sessions;
* graceful stop: the drain handshake (``draining`` ... ``drained``, bounded by ``drain_timeout``; plain
  clients closed after ``drain_grace``), then every queue flushed, the state written (``state_file``,
  temp file + rename, in a thread) and every socket closed with 1001.  :meth:`MessageNode.start` loads
  that file (then renames it ``<name>.loaded``, so a crash never replays a stale state).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgspec
from aiohttp import WSMsgType, web

from protofly.log import get_logger
from protofly.msgnode.core import (
    CLOSE_TRY_AGAIN_LATER,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_MESSAGES,
    DEFAULT_MAX_FRAME,
    DEFAULT_SEND_QUEUE,
    DEFAULT_SEND_QUEUE_BYTES,
    Action,
    Close,
    Drained,
    EnableBatch,
    MessageNodeCore,
    Replay,
    Send,
    SessionEnded,
    StateError,
)

__all__ = ["MessageNode"]

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


def _text_header(length: int) -> bytes:
    """Header of one final, unmasked text frame (RFC 6455 §5.2)."""
    if length < 126:
        return _SMALL_HEADERS[length]
    if length < 65536:
        return _HEADER16(0x81, 126, length)
    return _HEADER64(0x81, 127, length)


class _Connection:
    """One WebSocket: its bounded outgoing queue and the writer that coalesces it."""

    __slots__ = (
        "_drain_task",
        "_flush_handle",
        "_loop",
        "_node",
        "_request",
        "batch_frame",
        "closing",
        "limit_bytes",
        "limit_messages",
        "peer",
        "pending",
        "pending_bytes",
        "ws",
    )

    def __init__(self, node: MessageNode, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._node = node
        self._loop = asyncio.get_running_loop()
        self._request = request
        self.ws = ws
        self.peer = request.remote
        self.pending: list[Any] = []
        self.pending_bytes = 0
        #: 0: one message per frame; else the largest JSON-array frame this peer accepts.
        self.batch_frame = 0
        self.closing = False
        #: The queue's limits: the node's, raised by a replay until the queue has been written out.
        self.limit_messages = node.send_queue
        self.limit_bytes = node.send_queue_bytes
        self._flush_handle: asyncio.Handle | None = None
        self._drain_task: asyncio.Task[None] | None = None

    # -- queueing -----------------------------------------------------------------------------------

    def send(self, data: Any) -> None:
        if self.closing:
            self._node.stats["dropped_closing"] += 1
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
        elif self.pending_bytes > self._node.stats["queue_peak_bytes"]:
            self._node.stats["queue_peak_bytes"] = self.pending_bytes

    def replay(self, frames: list[bytes]) -> None:
        """Queue a re-opened session's buffered messages, raising the limits by as much.

        They were accepted while the session was detached; a reader that needs a while to take them in
        is not a slow consumer.  The limits fall back to the node's once the queue has been written out.
        """
        if self.closing:
            self._node.stats["dropped_closing"] += len(frames)
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
        if self.pending and self._drain_task is None:
            self._drain_task = self._node._spawn(self._drain())

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
        """Frame the first ``count`` queued messages and hand them to the transport in one call."""
        if count == 0:
            return
        transport = self._request.transport
        if count == len(self.pending):
            taken, size = self.pending, self.pending_bytes
            self.pending = []
        else:
            taken = self.pending[:count]
            del self.pending[:count]
            size = sum(len(d) for d in taken)
        self.pending_bytes -= size
        if not self.pending and self.limit_messages != self._node.send_queue:  # a replay is written out
            self.limit_messages = self._node.send_queue
            self.limit_bytes = self._node.send_queue_bytes
        if transport is None or transport.is_closing():
            return
        parts = self._frames(taken) if self.batch_frame and count > 1 else self._plain_frames(taken)
        transport.writelines(parts)
        stats = self._node.stats
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
            append(_text_header(len(data)))
            append(data)
        self._node.stats["frames_out"] += len(messages)
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
        parts.append(_text_header(len(payload)))
        parts.append(payload)
        self._node.stats["frames_out"] += 1

    async def _drain(self) -> None:
        """Wait (bounded) for the socket buffer to fall below its low water mark, then write on."""
        try:
            await asyncio.wait_for(self._request.writer.drain(), timeout=self._node.write_timeout)
        except TimeoutError:
            self._drain_task = None
            self._slow(f"no write progress for {self._node.write_timeout} s")
            return
        except ConnectionError:
            self._drain_task = None
            self._discard()
            return
        self._drain_task = None
        self._flush()

    # -- closing ------------------------------------------------------------------------------------

    def _overflow(self) -> None:
        node = self._node
        self._slow(f"send queue over {node.send_queue} messages or {node.send_queue_bytes} bytes")

    def _slow(self, why: str) -> None:
        self._node.stats["slow_consumers"] += 1
        _log.warning("slow consumer disconnected", peer=self.peer, reason=why, queued=len(self.pending))
        self._discard()
        # the close frame waits behind data the peer is not reading: give it a second, not close_timeout
        self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: " + why, timeout=min(1.0, self._node.close_timeout))

    def _discard(self) -> None:
        self._node.stats["dropped_closing"] += len(self.pending)
        self.pending = []
        self.pending_bytes = 0

    def close(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Write what is queued, then close with ``code`` (bounded: a stuck peer is aborted)."""
        if self.closing:
            return
        _log.info("closing connection", peer=self.peer, code=code, reason=reason)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.pending:
            self._write(len(self.pending))
        self.closing = True
        self._node.stats["closes_sent"] += 1
        self._node._spawn(self._close(code, reason, self._node.close_timeout if timeout is None else timeout))

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


class MessageNode:
    """A reTHINK (Vert.x protocol) message node for ``domain``, served at ``ws://host:port/ws``.

    Use it as an async context manager (or :meth:`start`/:meth:`stop`).  ``port=0`` picks a free port
    (read it from :attr:`port`); a fixed port can be reused right after :meth:`stop`, which is how tests
    restart a node under connected stubs.  :attr:`counters` merges the core's protocol counters with the
    shell's I/O counters; :meth:`wait_for` waits (bounded) until a condition on them holds.

    :meth:`stop` is graceful: drain clients are told ``draining`` and waited for (``drain_timeout``), plain
    clients get ``drain_grace``, and with a ``state_file`` the sessions, allocations, subscriptions and
    buffered messages are written there, for the next node's :meth:`start` to load.
    """

    def __init__(
        self,
        domain: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        session_grace: float = 30.0,
        auth_tokens: Collection[str] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        send_queue: int = DEFAULT_SEND_QUEUE,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        ping_interval: float | None = 20.0,
        close_timeout: float = 5.0,
        write_timeout: float = 30.0,
        drain_timeout: float = 5.0,
        drain_grace: float = 0.2,
        state_file: Path | str | None = None,
        buffer_messages: int = DEFAULT_BUFFER_MESSAGES,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        max_addresses: int = 10_000,
        max_block: int = 1_000,
        max_bound: int = 1_000,
        max_subscriptions: int = 10_000,
    ) -> None:
        self.core = MessageNodeCore(
            domain,
            session_grace=session_grace,
            auth_tokens=auth_tokens,
            max_frame=max_frame,
            max_addresses=max_addresses,
            max_block=max_block,
            max_bound=max_bound,
            max_subscriptions=max_subscriptions,
            buffer_messages=buffer_messages,
            buffer_bytes=buffer_bytes,
        )
        self.domain = self.core.domain
        self.host = host
        self.port = port
        self.max_frame = max_frame
        self.send_queue = send_queue
        self.send_queue_bytes = send_queue_bytes
        self.ping_interval = ping_interval or None
        self.close_timeout = close_timeout
        self.write_timeout = write_timeout
        self.drain_timeout = drain_timeout
        self.drain_grace = drain_grace
        self.state_file = None if state_file is None else Path(state_file)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "frames_in",
                "bytes_in",
                "binary_frames",
                "bad_frames",
                "messages_out",
                "frames_out",
                "bytes_out",
                "writes",
                "slow_consumers",
                "dropped_closing",
                "closes_sent",
                "queue_peak_bytes",
                "transport_peak_bytes",
                "refused_draining",
            ),
            0,
        )
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._drained: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._changed: asyncio.Event | None = None
        self._log = _log.bind(domain=self.domain)

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Load the state file (if any), then listen.  A state file that cannot be loaded is an error.

        :class:`StateError` names the file and the problem; a ``state_file`` that does not exist yet
        starts an empty node (its directory must exist: the state is written there at :meth:`stop`).
        """
        if self._runner is not None:
            raise RuntimeError("message node already started")
        loaded = await self._load_state()
        self._changed = asyncio.Event()
        self._stopping = False
        app = web.Application()
        app.router.add_get("/ws", self._handle_ws)
        app.router.add_get("/stats", self._handle_stats)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=self.close_timeout, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        if loaded is not None:
            await self._consume_state()
        self._arm_timer()
        self._log.info("message node listening", url=self.url, auth=self.core.auth_required, sessions_restored=loaded)

    async def stop(self) -> None:
        """Drain, write the state file (if configured), close every connection (1001), stop listening.

        Everything this node started is cancelled.  A state file that cannot be written raises
        :class:`StateError` once the node is down (the operator must know the state is lost).
        """
        runner = self._runner
        if runner is None or self._stopping:
            return
        self._stopping = True
        await self._drain()
        failure: StateError | None = None
        if self.state_file is not None:
            try:
                await self._save_state()
            except StateError as exc:
                failure = exc
                self._log.error("message node state not saved", error=str(exc))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.close_timeout + 1)
        self._runner = None
        await runner.cleanup()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)
        self._log.info("message node stopped", url=self.url)
        if failure is not None:
            raise failure

    async def _drain(self) -> None:
        """The drain handshake: after it the core is frozen and every connection is closing (1001).

        Drain clients are told ``draining`` and routed as usual until each says ``drained`` (its last
        frame; TCP order means all it sent before is routed) or ``drain_timeout`` passes.  Plain clients
        are closed after ``drain_grace`` (their sessions detach: what is routed to them from then on is
        buffered).  New connections are refused meanwhile (HTTP 503).
        """
        core = self.core
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._drained = asyncio.Event()
        self._apply(core.begin_drain())
        if core.drain_pending:
            self._log.info("draining", drain_clients=core.drain_pending, plain=core.plain_connections())
        if core.plain_connections():
            await asyncio.sleep(self.drain_grace)  # a grace period, not a wait for an event: plain peers send none
            self._apply(core.close_plain(loop.time()))
        deadline = started + self.drain_timeout
        while core.drain_pending:  # re-checked: a drain client may still open a session meanwhile
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._log.warning(
                    "drain timeout: closing clients that did not say drained",
                    clients=core.drain_pending,
                    timeout=self.drain_timeout,
                )
                break
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=remaining)
        self._apply(core.finish_drain(loop.time()))

    # -- state file ---------------------------------------------------------------------------------

    async def _load_state(self) -> int | None:
        """Sessions restored from the state file; None when there is no file (or none configured)."""
        path = self.state_file
        if path is None:
            return None
        snapshot = await asyncio.to_thread(_read_state, path)
        if snapshot is None:
            self._log.info("no message node state to load", state_file=str(path))
            return None
        try:
            count = self.core.restore(snapshot, asyncio.get_running_loop().time())
        except StateError as exc:
            raise StateError(f"state file {path}: {exc}") from None
        self._log.info("message node state loaded", state_file=str(path), sessions=count)
        return count

    async def _consume_state(self) -> None:
        """Move the loaded file aside: after a crash the next start must not replay a stale state."""
        path = self.state_file
        assert path is not None
        try:
            await asyncio.to_thread(os.replace, path, path.with_name(path.name + ".loaded"))
        except OSError as exc:
            self._log.warning("loaded state file not moved aside", state_file=str(path), error=str(exc))

    async def _save_state(self) -> None:
        path = self.state_file
        assert path is not None
        snapshot = self.core.snapshot()  # taken on the loop, while the core is frozen; written in a thread
        try:
            size = await asyncio.to_thread(_write_state, path, snapshot)
        except OSError as exc:
            raise StateError(f"state file {path}: cannot write it ({exc})") from None
        self._log.info("message node state saved", state_file=str(path), sessions=len(snapshot["sessions"]), bytes=size)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- observation --------------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """Protocol counters (core), I/O counters (shell) and gauges, as one fresh dict."""
        merged = dict(self.core.counters)
        merged.update(self.stats)
        merged["open_connections"] = len(self._connections)
        merged["sessions"] = self.core.session_count
        merged["addresses"] = self.core.address_count
        return merged

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate()`` is true; raise :class:`TimeoutError` after ``timeout`` seconds.

        The predicate is re-checked whenever a session ends or a connection comes or goes, and at least
        every 20 ms (for conditions on traffic counters, which do not signal).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not reached within {timeout} s")
            changed = self._changed
            if changed is None:
                await asyncio.sleep(min(remaining, 0.02))
                continue
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 0.02))

    # -- handlers -----------------------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.ping_interval,
            max_msg_size=self.max_frame,
            compress=False,
            decode_text=False,
            timeout=self.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.json_response({"code": 400, "description": "expected a WebSocket upgrade"}, status=400)
        if self._stopping:
            self.stats["refused_draining"] += 1
            return web.json_response(
                {"code": 503, "description": "message node shutting down: retry shortly"}, status=503
            )
        await ws.prepare(request)
        conn = _Connection(self, ws, request)
        self._connections.add(conn)
        core = self.core
        apply = self._apply
        stats = self.stats
        apply(core.connected(conn))
        self._signal()
        try:
            async for frame in ws:
                kind = frame.type
                if kind is WSMsgType.TEXT:
                    data = frame.data
                    stats["frames_in"] += 1
                    stats["bytes_in"] += len(data)
                    apply(core.received(conn, data))
                elif kind is WSMsgType.BINARY:
                    stats["binary_frames"] += 1
                    apply(core.received_binary(conn))
                elif kind is WSMsgType.ERROR:
                    stats["bad_frames"] += 1
                    self._log.info("websocket error, connection closed", peer=conn.peer, error=str(frame.data))
        finally:
            self._connections.discard(conn)
            conn.finished()
            apply(core.disconnected(conn, asyncio.get_running_loop().time()))
            self._arm_timer()
            self._signal()
        return ws

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"domain": self.domain, **self.counters})

    # -- actions ------------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Send:
                action.conn.send(action.data)  # type: ignore[union-attr]
            elif kind is Close:
                action.conn.close(action.code, action.reason)  # type: ignore[union-attr]
            elif kind is EnableBatch:
                action.conn.enable_batch(action.max_frame)  # type: ignore[union-attr]
            elif kind is Replay:
                action.conn.replay(action.frames)  # type: ignore[union-attr]
            elif kind is Drained:
                if action.remaining == 0 and self._drained is not None:  # type: ignore[union-attr]
                    self._drained.set()
            elif kind is SessionEnded:
                self._log.info(
                    "session ended",
                    session=action.url,
                    reason=action.reason,  # type: ignore[union-attr]
                    addresses=action.addresses,
                )  # type: ignore[union-attr]
                self._signal()

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        timer = self._timer
        if timer is not None:
            if deadline is not None and timer.when() == deadline:
                return
            timer.cancel()
            self._timer = None
        if deadline is not None and self._runner is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.core.tick(asyncio.get_running_loop().time()))
        self._arm_timer()

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a task this node owns: kept referenced, cancelled by :meth:`stop`."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# -- state file I/O (run in a thread) -----------------------------------------------------------------------


def _read_state(path: Path) -> Any:
    """The decoded JSON of the state file; None if it does not exist (its directory must)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise StateError(f"state file {path}: its directory does not exist") from None
        return None
    except OSError as exc:
        raise StateError(f"state file {path}: cannot read it ({exc})") from None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise StateError(f"state file {path}: not valid JSON ({exc}); move it away to start an empty node") from None


def _write_state(path: Path, snapshot: dict[str, Any]) -> int:
    """Write atomically: a temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    data = msgspec.json.encode(snapshot)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return len(data)
