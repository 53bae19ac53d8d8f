"""The message node's network shell: aiohttp WebSocket server around :class:`MessageNodeCore`.

Everything protocol-shaped lives in the core; this module only moves bytes and time:

* reading: aiohttp parses every frame of a socket read into its queue, and the per-connection loop
  hands them to the core one after the other without going back to the event loop in between
  (``decode_text=False``: the core gets the frame's bytes, never a ``str`` it would have to re-encode);
* writing: each connection is a :class:`~protofly.msgnode.writer.FrameWriter` (``writer.py``): a bounded
  queue written in coalesced system calls, a slow consumer disconnected with close code 1013;
* time: a timer armed at the core's :meth:`~MessageNodeCore.next_deadline` expires detached sessions;
* graceful stop: the drain handshake (``draining`` ... ``drained``, bounded by ``drain_timeout``; plain
  clients closed after ``drain_grace``), then every queue flushed, the state written (``state_file``,
  ``statefile.py``, in a thread) and every socket closed with 1001.  :meth:`MessageNode.start` loads that
  file (then renames it ``<name>.loaded``, so a crash never replays a stale state).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from aiohttp import WSMsgType, web

from protofly.log import get_logger
from protofly.msgnode.acks import DEFAULT_ACK_DELAY
from protofly.msgnode.actions import (
    Ack,
    Action,
    Allocate,
    Claim,
    Close,
    Drained,
    EnableBatch,
    Replay,
    Send,
    SessionEnded,
)
from protofly.msgnode.core import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_MESSAGES,
    DEFAULT_MAX_FRAME,
    DEFAULT_SEND_QUEUE,
    DEFAULT_SEND_QUEUE_BYTES,
    MessageNodeCore,
)
from protofly.msgnode.journal import Journal
from protofly.msgnode.remote import ClusterUnavailable
from protofly.msgnode.snapshot import StateError
from protofly.msgnode.statefile import move_aside, read_state, write_state
from protofly.msgnode.writer import FrameWriter
from protofly.tasks import TaskSet

if TYPE_CHECKING:
    from protofly.msgnode.cluster.link import ClusterLink

__all__ = ["MessageNode"]

_log = get_logger("protofly.msgnode")


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
        state_dir: Path | str | None = None,
        fsync_interval: float | None = 1.0,
        checkpoint_bytes: int = 64 << 20,
        cluster: str | None = None,
        node_id: str | None = None,
        ack_delay: float = DEFAULT_ACK_DELAY,
    ) -> None:
        if state_dir is not None and state_file is not None:
            raise ValueError("state_dir (durable state) and state_file (graceful-stop state) exclude each other")
        #: Durable state (``journal.py``): every change on disk before the node acts on it.
        self.journal = None if state_dir is None else Journal(Path(state_dir), checkpoint_bytes=checkpoint_bytes)
        self.fsync_interval = fsync_interval
        #: NATS servers (comma separated) of the domain's cluster; None: a single-process node, no NATS.
        self.cluster = cluster
        self.node_id = node_id
        self.link: ClusterLink | None = None
        self.core: MessageNodeCore = MessageNodeCore(
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
            journal=state_dir is not None,
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
        #: Seconds an ack may wait for data going to its peer (``writer.py``); 0: every ack at once.
        self.ack_delay = ack_delay
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
        self._connections: set[FrameWriter] = set()
        #: Writers' drain waits and closes; a new set per start (a stopped set refuses new tasks).
        self._tasks = TaskSet("msgnode")
        self._timer: asyncio.TimerHandle | None = None
        self._syncing: asyncio.Task[None] | None = None
        #: The end-of-turn journal write, when records wait and no socket write has taken them yet.
        self._committing: asyncio.Handle | None = None
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
        if self.journal is not None:
            loaded = self._recover()
        if self.cluster is not None:
            await self._join()
        self._tasks = TaskSet("msgnode")
        self._stopping = False
        app = web.Application()
        app.router.add_get("/ws", self._handle_ws)
        app.router.add_get("/stats", self._handle_stats)
        self._add_observation_routes(app)
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
        if loaded is not None and self.journal is None:
            await self._consume_state()
        if self.journal is not None and self.fsync_interval:
            self._syncing = self._tasks.spawn(self._sync_periodically(self.journal, self.fsync_interval))
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
        await self._leave()
        failure: StateError | None = None
        if self.journal is not None:
            syncing, self._syncing = self._syncing, None
            if syncing is not None:
                syncing.cancel()
                await asyncio.wait([syncing], timeout=self.close_timeout)
            if self._committing is not None:
                self._committing.cancel()
                self._committing = None
            self._persist(final=True)
            self.journal.close()
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
        await self._tasks.close(timeout=1)
        self._log.info("message node stopped", url=self.url)
        if failure is not None:
            raise failure

    # -- cluster (msgnode/cluster/, imported only when clustered) ---------------------------------------

    async def _join(self) -> None:
        from protofly.msgnode.cluster.link import ClusterLink

        servers = [server.strip() for server in (self.cluster or "").split(",") if server.strip()]
        link = ClusterLink(self.core, self._apply, servers, node_id=self.node_id)
        try:
            await link.start()
        except Exception as exc:
            await link.close()
            raise ClusterUnavailable(f"cannot join the cluster at {self.cluster}: {exc or type(exc).__name__}") from exc
        self.link = link
        self.node_id = link.node_id
        self.core.remote = link

    async def _leave(self) -> None:
        """After the drain: hand every session held here to the cluster (buffers to their streams), leave."""
        link = self.link
        if link is None:
            return
        from protofly.msgnode.cluster.claim import hand_over

        try:
            handed = await asyncio.wait_for(hand_over(link), timeout=self.drain_timeout)
            self._log.info("sessions handed to the cluster", sessions=handed)
        except Exception as exc:
            self._log.error("sessions not handed to the cluster", error=str(exc) or type(exc).__name__)
        self.core.remote = None
        await link.close()
        self.link = None

    def _cluster_action(self, action: Allocate | Claim) -> None:
        link = self.link
        if link is None:  # the node left its cluster while the request was on its way
            return
        from protofly.msgnode.cluster import claim

        if isinstance(action, Allocate):
            self._tasks.spawn(claim.allocate(link, action), name="cluster allocate")
        else:
            self._tasks.spawn(claim.claim(link, action), name="cluster claim")

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
        snapshot = await asyncio.to_thread(read_state, path)
        if snapshot is None:
            self._log.info("no message node state to load", state_file=str(path))
            return None
        try:
            count = self.core.restore(snapshot, asyncio.get_running_loop().time())
        except StateError as exc:
            raise StateError(f"state file {path}: {exc}") from None
        self._log.info("message node state loaded", state_file=str(path), sessions=count)
        return count

    def _recover(self) -> int | None:
        """Load the checkpoint and replay the journal (durable state), then checkpoint afresh."""
        journal = self.journal
        assert journal is not None
        snapshot, records = journal.load()
        count = None
        if snapshot is not None:
            try:
                count = self.core.restore(snapshot, asyncio.get_running_loop().time())
            except StateError as exc:
                raise StateError(f"state directory {journal.directory}: {exc}") from None
            replayed = self.core.apply_journal(records)
            self._log.info("message node state recovered", sessions=count, journal_records=replayed)
        self.core.take_journal()
        journal.open()
        journal.checkpoint(self.core.snapshot(), sync=self.fsync_interval is not None)
        return count

    def _commit(self) -> None:
        """The writers' barrier and the end of a turn: the journal records waiting, on disk now."""
        handle, self._committing = self._committing, None
        if handle is not None:
            handle.cancel()
        if self.core.journal:
            self._persist()

    def _persist(self, *, final: bool = False) -> None:
        """Write what the core changed before acting on it: journal records, or a checkpoint."""
        journal = self.journal
        assert journal is not None
        records = self.core.take_journal()
        if not records and not final:
            return
        if final or journal.due or not journal.append(records):
            journal.checkpoint(self.core.snapshot(), sync=self.fsync_interval == 0 or final)
            return
        if self.fsync_interval == 0:
            journal.sync()

    async def _sync_periodically(self, journal: Journal, interval: float) -> None:
        """fsync the journal every ``interval`` seconds (a machine crash loses at most that much)."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(journal.sync)

    async def _consume_state(self) -> None:
        """Move the loaded file aside: after a crash the next start must not replay a stale state."""
        path = self.state_file
        assert path is not None
        try:
            await asyncio.to_thread(move_aside, path)
        except OSError as exc:
            self._log.warning("loaded state file not moved aside", state_file=str(path), error=str(exc))

    async def _save_state(self) -> None:
        path = self.state_file
        assert path is not None
        snapshot = self.core.snapshot()  # taken on the loop, while the core is frozen; written in a thread
        try:
            size = await asyncio.to_thread(write_state, path, snapshot)
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
        if self.link is not None:
            merged.update({f"cluster_{name}": value for name, value in self.link.counters.items()})
            merged["cluster_nodes"] = len(self.link.alive_nodes)
            merged["cluster_resource_nodes"] = max((len(n) for n in self.link.resource_nodes.values()), default=0)
            merged["cluster_nats_port"] = self.link.nats_port
        return merged

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
        conn = FrameWriter(
            ws,
            request,
            stats=self.stats,
            tasks=self._tasks,
            send_queue=self.send_queue,
            send_queue_bytes=self.send_queue_bytes,
            write_timeout=self.write_timeout,
            close_timeout=self.close_timeout,
            on_slow=self._slow_consumer,
            barrier=None if self.journal is None else self._commit,
            ack_delay=self.ack_delay,
        )
        self._connections.add(conn)
        core = self.core
        apply = self._apply
        stats = self.stats
        apply(core.connected(conn))
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
        return ws

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"domain": self.domain, "node": self.node_id, **self.counters})

    def _add_observation_routes(self, app: web.Application) -> None:
        """``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (taking sessions: not draining)."""
        from protofly.msgnode.metrics import CONTENT_TYPE, node_metrics

        render = node_metrics(self)

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "alive", "domain": self.domain})

        async def readyz(request: web.Request) -> web.Response:
            ready = not (self._stopping or self.core.draining)
            return web.json_response({"ready": ready, "domain": self.domain}, status=200 if ready else 503)

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)

    # -- actions ------------------------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        if self.journal is not None and self.core.journal and self._committing is None:
            # group commit: the turn's records are written once, before the first byte of this turn leaves
            # the node (the writers' barrier) or at the end of the turn, whichever comes first
            self._committing = asyncio.get_running_loop().call_soon(self._commit)
        for action in actions:
            if type(action) is Send:  # nearly every action: one type check instead of the match's patterns
                conn = action.conn
                if isinstance(conn, FrameWriter):
                    conn.send(action.data)
                continue
            match action:
                case Ack(conn=FrameWriter() as conn, data=data, delayed=delayed):
                    conn.ack(bytes(data), delayed)
                case Send(conn=FrameWriter() as conn, data=data):
                    conn.send(data)
                case Close(conn=FrameWriter() as conn, code=code, reason=reason):
                    conn.close(code, reason)
                case EnableBatch(conn=FrameWriter() as conn, max_frame=max_frame):
                    conn.enable_batch(max_frame)
                case Replay(conn=FrameWriter() as conn, frames=frames):
                    conn.replay(frames)
                case Drained(remaining=remaining):
                    if remaining == 0 and self._drained is not None:
                        self._drained.set()
                case SessionEnded(url=url, reason=reason, addresses=addresses):
                    self._log.info("session ended", session=url, reason=reason, addresses=addresses)
                case Allocate() | Claim():
                    if self.journal is not None:
                        self._commit()
                    self._cluster_action(action)

    def _slow_consumer(self, conn: FrameWriter, pending: list[object]) -> None:
        """The writer cut ``conn`` off: its session detaches and keeps (or answers) what was queued."""
        self._apply(self.core.slow_consumer(conn, pending, asyncio.get_running_loop().time()))
        self._arm_timer()

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
