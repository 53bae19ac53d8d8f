"""One node's link to its domain's cluster: NATS JetStream as the shared tables and the wire between nodes.

:class:`ClusterLink` is the :class:`~protofly.msgnode.remote.Remote` a clustered :class:`MessageNode` plugs
into its core.  What lives in NATS (names in ``names.py``):

* **address ownership** -- KV bucket ``addresses`` (address -> session URL) and ``keys`` (allocationKey ->
  session URL): an allocation *creates* its keys (create-if-absent, atomic in JetStream), so two nodes
  racing for one allocationKey get one owner; release deletes them;
* **session records** -- KV bucket ``sessions`` (:class:`SessionRecord`: runtime URL, token hash, owner node,
  addresses, subscriptions, detached-since), written only by the owner, each write a compare-and-swap on
  the revision it last wrote: a node that lost a session to a ``re-open`` elsewhere learns it there;
* **routing** -- each node subscribes to one subject per session it holds; a message for a session on
  another node is published there with a reply subject, so NATS answers "no responders" when nobody holds
  it (node gone), and a node that no longer holds it answers ``gone``: either way the message goes to the
  session's **buffer** (stream ``BUFFERS``, one subject per session, bounded by count and age), or, if the
  session no longer exists, back to its sender as ``404``;
* **subscriptions** -- one subject per resource, subscribed once per node with subscribers (bucket
  ``subscriptions`` says which nodes): a publication is one NATS publish, fanned out by each node;
* **liveness** -- every node puts a heartbeat in bucket ``nodes`` (bucket-wide TTL: nats-server 2.9 has no
  per-key TTL).

Every node caches the buckets through KV watchers, so routing decisions are dictionary look-ups on the
loop; NATS I/O is queued to the link's own tasks.  ``claim.py`` takes sessions over and hands them on.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from protofly.log import get_logger
from protofly.msgnode.actions import Action
from protofly.msgnode.cluster.names import Names, SessionRecord, session_id, token_hash, url_key
from protofly.msgnode.core import MessageNodeCore
from protofly.msgnode.session import Session
from protofly.tasks import TaskSet

__all__ = ["ClusterLink"]

_log = get_logger("protofly.msgnode.cluster")
_decode_record = msgspec.json.Decoder(SessionRecord).decode
_encode = msgspec.json.encode
#: Forwarded messages kept for a re-send after their node died: at most this many, this many seconds.
_SENT_MAX = 100_000
_SENT_BYTES = 64 << 20
#: How long a message bound for a buffer stream waits for JetStream (a leader re-elected) before a 503.
_BUFFER_RETRY_SECONDS = 10.0
_SENT_SECONDS = 5.0


class ClusterLink:
    """The cluster part of one node (see the module docstring); ``apply`` carries out the core's actions."""

    def __init__(
        self,
        core: MessageNodeCore,
        apply: Callable[[list[Action]], None],
        servers: list[str],
        *,
        node_id: str | None = None,
        replicas: int = 3,
        heartbeat: float = 0.5,
        buffer_age: float = 3600.0,
        timeout: float = 5.0,
    ) -> None:
        self.core = core
        self.apply = apply
        self.servers = servers
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.names = Names(core.domain)
        self._domain_part = f"://{core.domain}/"
        self.replicas = replicas
        self.heartbeat = heartbeat
        self.buffer_age = buffer_age
        self.timeout = timeout
        self.counters: dict[str, int] = dict.fromkeys(
            ("published", "no_responders", "gone", "to_buffer", "buffer_failed", "takeovers", "kv_errors", "resent"),
            0,
        )
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.kv: dict[str, KeyValue] = {}
        # caches of the buckets (kept by watchers)
        self.owner_of: dict[str, str] = {}  # address -> session URL
        self.records: dict[str, SessionRecord] = {}  # session id -> record
        self.by_runtime: dict[str, str] = {}  # runtime URL -> session URL
        self.resource_nodes: dict[str, set[str]] = {}  # resource -> nodes with subscribers
        self.nodes: dict[str, float] = {}  # node -> last heartbeat seen (loop time)
        self.nodes_seen: dict[str, float] = {}  # node -> last heartbeat seen (monotonic, kept after it leaves)
        # what this node holds
        self.session_subs: dict[str, Subscription] = {}  # session id -> subscription
        self.sub_urls: dict[str, str] = {}  # subject -> session URL
        self.resource_subs: dict[str, Subscription] = {}  # resource -> subscription
        self.resource_by_subject: dict[str, str] = {}
        self.revisions: dict[str, int] = {}  # session id -> revision this node last wrote
        self.written: dict[str, SessionRecord] = {}
        self._dirty: dict[str, Session | None] = {}
        self._detached: dict[str, float] = {}  # session id -> wall-clock time its socket went
        self._dirty_event = asyncio.Event()
        self._out: collections.deque[tuple[str, bytes, str]] = collections.deque()
        self._out_event = asyncio.Event()
        self._seq = 0
        #: What this node forwarded lately, by publish number: (monotonic time, session URL, data).  An entry
        #: answers a "no responders"/"gone" (then it is buffered and dropped here), and is sent again when
        #: the node that held its session died with it in flight (``resend``).  Bounded by count and age.
        self._sent: dict[int, tuple[float, str, bytes]] = {}
        self._sent_bytes = 0
        #: Sessions being claimed here: what arrives for them before the claim completes waits here.
        self.claiming: dict[str, list[bytes]] = {}
        self._tasks = TaskSet("msgnode-cluster")
        self._closing = False
        #: Set by the graceful stop's hand-over: no more record writes of its own.
        self.leaving = False
        self._log = _log.bind(domain=core.domain, node=self.node_id)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, make sure the buckets and the buffer stream exist, load the caches, start heartbeats."""
        self.nc = await asyncio.wait_for(self._connect(), timeout=2 * self.timeout)
        self.js = self.nc.jetstream(timeout=self.timeout)
        names = self.names
        for bucket in (names.addresses, names.keys, names.sessions, names.subscriptions):
            self.kv[bucket] = await self._bucket(bucket)
        self.kv[names.nodes] = await self._bucket(names.nodes, ttl=max(3 * self.heartbeat, 1.0))
        await self._setup(self._buffer_stream)
        await self._setup(self._beat)
        ready = [asyncio.get_running_loop().create_future() for _ in range(5)]
        watched = (names.addresses, names.keys, names.sessions, names.subscriptions, names.nodes)
        for bucket, future in zip(watched, ready, strict=True):
            self._tasks.spawn(self._watch(bucket, future), name=f"watch {bucket}")
        await asyncio.wait_for(asyncio.gather(*ready), timeout=self.timeout)
        await self.nc.subscribe(names.control(self.node_id), cb=self._on_control)
        await self.nc.subscribe(names.resend, cb=self._on_resend)
        await self.nc.subscribe(names.inbox(self.node_id) + ".*", cb=self._on_inbox)
        self._tasks.spawn(self._writer(), name="cluster publisher")
        self._tasks.spawn(self._record_writer(), name="cluster records")
        self._tasks.spawn(self._heartbeats(), name="cluster heartbeats")
        self._log.info("cluster joined", servers=",".join(self.servers), nodes=len(self.nodes))

    async def _connect(self) -> Client:
        """The NATS connection: reconnects for ever once made (its first connect is bounded by the caller)."""
        return await nats.connect(
            self.servers,
            name=f"protofly-msgnode-{self.node_id}",
            no_echo=True,
            connect_timeout=2,
            reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
            pending_size=64 << 20,
            error_cb=self._nats_error,
            reconnected_cb=self._reconnected,
        )

    async def _reconnected(self) -> None:
        """Back on NATS (another server): what was buffered for our sessions meanwhile is delivered now."""
        self._log.info("nats reconnected")
        for url in list(self.sub_urls.values()):
            self._tasks.spawn(self.deliver_buffer(url), name="deliver buffer")

    async def deliver_buffer(self, url: str) -> None:
        """Deliver what waits in the buffer stream of session ``url`` (held here) to it, in order."""
        from protofly.msgnode.cluster.claim import take_buffer

        if session_id(url) not in self.session_subs:
            return
        try:
            frames = await take_buffer(self, session_id(url))
        except Exception as exc:
            self._log.warning("buffer not read", error=str(exc) or type(exc).__name__)
            return
        for frame in frames:
            actions = self.core.remote_deliver(url, frame)
            if actions is None:  # it moved meanwhile: follow it
                self.send_to_session(url, frame)
            else:
                self.apply(actions)

    async def _buffer_stream(self) -> None:
        assert self.js is not None
        names = self.names
        config = StreamConfig(
            name=names.buffers,
            subjects=[names.buffer_subjects],
            retention=RetentionPolicy.LIMITS,
            max_msgs_per_subject=self.core.buffer_messages,
            max_age=self.buffer_age,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:  # another node made it (with its own limits): use it as it is
            await self.js.stream_info(names.buffers)

    async def _bucket(self, name: str, ttl: float | None = None) -> KeyValue:
        """Bind to bucket ``name``, creating it if no node has yet (nodes starting together race here)."""

        async def bind() -> KeyValue:
            assert self.js is not None
            try:
                return await self.js.key_value(name)
            except BucketNotFoundError:
                return await self.js.create_key_value(bucket=name, history=1, replicas=self.replicas, ttl=ttl)

        result: KeyValue = await self._setup(bind)
        return result

    async def _setup(self, step: Callable[[], Any]) -> Any:
        """Run one setup ``step``, retried (bounded) while JetStream is busy with another node's setup."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * self.timeout
        while True:
            try:
                return await step()
            except Exception:  # e.g. "no response from stream" while another node creates it
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)  # JetStream says nothing when the other node's stream is ready

    async def close(self) -> None:
        """Write what is still queued, leave the cluster (heartbeat deleted), close the connection."""
        self._closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), timeout=self.timeout)
        with contextlib.suppress(Exception):
            await self.kv[self.names.nodes].delete(self.node_id)
        await self._tasks.close(timeout=1)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), timeout=self.timeout)
            self.nc = None

    async def _flush(self) -> None:
        """Wait (bounded by the caller) until the publish queue and the record writes are done."""
        while self._out or self._dirty:  # noqa: ASYNC110 - the writers signal nothing back; the queues are short
            await asyncio.sleep(0.01)
        if self.nc is not None:
            await self.nc.flush(timeout=int(self.timeout))

    async def _nats_error(self, exc: Exception) -> None:
        self._log.warning("nats", error=str(exc) or type(exc).__name__)

    @property
    def alive_nodes(self) -> list[str]:
        now = asyncio.get_running_loop().time()
        limit = max(3 * self.heartbeat, 1.0)
        return sorted(node for node, seen in self.nodes.items() if now - seen <= limit)

    # -- caches ---------------------------------------------------------------------------------------

    async def _watch(self, bucket: str, ready: asyncio.Future[None]) -> None:
        """Keep the cache of ``bucket``; a watcher that fails (NATS trouble) is made again."""
        while True:
            try:
                await self._watch_once(bucket, ready)
            except Exception as exc:
                self._log.warning("cluster watcher restarted", bucket=bucket, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(0.5)  # then watch again from the current values

    async def _watch_once(self, bucket: str, ready: asyncio.Future[None]) -> None:
        watcher = await self.kv[bucket].watchall()
        apply = {
            self.names.addresses: self._seen_address,
            self.names.keys: lambda key, value: None,
            self.names.sessions: self._seen_session,
            self.names.subscriptions: self._seen_subscription,
            self.names.nodes: self._seen_node,
        }[bucket]
        async for entry in watcher:
            if entry is None:
                if not ready.done():
                    ready.set_result(None)
                continue
            value = None if entry.operation in ("DEL", "PURGE") else entry.value
            try:
                apply(entry.key, value)
            except (msgspec.DecodeError, ValueError) as exc:
                self._log.warning("bad cluster entry", bucket=bucket, key=entry.key, error=str(exc))

    def _seen_address(self, key: str, value: bytes | None) -> None:
        address = _unkey(key)
        if value is None:
            self.owner_of.pop(address, None)
        else:
            self.owner_of[address] = value.decode()

    def _seen_session(self, key: str, value: bytes | None) -> None:
        old = self.records.pop(key, None)
        if old is not None and self.by_runtime.get(old.runtime) == old.url:
            del self.by_runtime[old.runtime]
        if value is not None:
            record = _decode_record(value)
            self.records[key] = record
            self.by_runtime[record.runtime] = record.url

    def _seen_subscription(self, key: str, value: bytes | None) -> None:
        encoded, _, node = key.rpartition(".")
        resource = _unkey(encoded)
        nodes = self.resource_nodes.setdefault(resource, set())
        if value is None:
            nodes.discard(node)
            if not nodes:
                del self.resource_nodes[resource]
        else:
            nodes.add(node)

    def _seen_node(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.nodes.pop(key, None)
        else:
            self.nodes[key] = asyncio.get_running_loop().time()
            self.nodes_seen[key] = time.monotonic()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
            except Exception as exc:  # NATS unreachable for now: the next beat retries
                self.counters["kv_errors"] += 1
                self._log.warning("heartbeat not written", error=str(exc) or type(exc).__name__)

    async def _beat(self) -> None:
        await self.kv[self.names.nodes].put(self.node_id, _encode({"t": time.time()}))

    # -- routing (Remote) ---------------------------------------------------------------------------

    def session_url_of(self, to: str) -> str | None:
        """The session URL ``to`` routes to anywhere in the cluster (allocated address, or runtime URL)."""
        url = self.owner_of.get(to)
        if url is not None:
            return url
        by_runtime = self.by_runtime
        url = by_runtime.get(to)
        end = to.rfind("/")
        while url is None and end > 0:
            url = by_runtime.get(to[:end])
            end = to.rfind("/", 0, end)
        return url

    def forward(self, to: str, data: bytes) -> bool:
        url = self.session_url_of(to)
        if url is None:
            if self._domain_part not in to or to in self.resource_nodes or self.core.subscriptions.subscribers(to):
                return False  # not an address of this domain, or a resource someone subscribed to
            # an address of this domain unknown to the cache (just allocated, or a watcher catching up
            # after NATS trouble): ask the table itself before answering 404
            self._tasks.spawn(self._look_up(to, data), name="address look-up")
            return True
        sid = session_id(url)
        record = self.records.get(sid)
        if record is not None and record.owner == self.node_id and sid in self.session_subs:
            return False  # stale: this node would have found it in its own tables
        self.send_to_session(url, data)
        return True

    async def _look_up(self, to: str, data: bytes) -> None:
        try:
            entry = await self.kv[self.names.addresses].get(url_key(to))
            url = None if entry.value is None else entry.value.decode()
        except KeyNotFoundError:
            url = None
        except Exception as exc:
            self.counters["kv_errors"] += 1
            self.apply(self.core.undeliverable(data, 503, f"no route to {to} now: the cluster is unavailable ({exc})"))
            return
        if url is None:
            text = f"no route to {to}: not an allocated address, runtime or subscribed resource in {self.core.domain}"
            self.apply(self.core.undeliverable(data, 404, text))
            return
        self.owner_of[to] = url
        actions = self.core.remote_deliver(url, data)  # it may be ours after all
        if actions is not None:
            self.apply(actions)
        else:
            self.send_to_session(url, data)

    def send_to_session(self, url: str, data: bytes) -> None:
        """Publish ``data`` to session ``url``'s subject; "no responders"/"gone" send it to its buffer."""
        self._seq += 1
        seq = self._seq
        now = time.monotonic()
        sent = self._sent
        while sent:
            first = next(iter(sent))
            when, _, old = sent[first]
            if now - when <= _SENT_SECONDS and len(sent) < _SENT_MAX and self._sent_bytes < _SENT_BYTES:
                break
            del sent[first]
            self._sent_bytes -= len(old)
        sent[seq] = (now, url, data)
        self._sent_bytes += len(data)
        self._queue(self.names.session(session_id(url)), data, f"{self.names.inbox(self.node_id)}.{seq}")

    def fan_out(self, resource: str, data: bytes) -> bool:
        nodes = self.resource_nodes.get(resource)
        if not nodes or nodes == {self.node_id}:
            return False
        self._queue(self.names.resource(resource), data, "")
        return True

    def _queue(self, subject: str, data: bytes, reply: str) -> None:
        self._out.append((subject, data, reply))
        self.counters["published"] += 1
        if not self._out_event.is_set():
            self._out_event.set()

    async def _writer(self) -> None:
        """Every queued publish, in order, from one task (nats-py publishes are coroutines)."""
        out = self._out
        while True:
            await self._out_event.wait()
            self._out_event.clear()
            nc = self.nc
            assert nc is not None
            while out:
                subject, data, reply = out[0]
                try:
                    await nc.publish(subject, data, reply=reply)
                except Exception as exc:  # disconnected beyond the client's reconnect buffer: retry shortly
                    self._log.warning("publish failed, retrying", error=str(exc) or type(exc).__name__)
                    await asyncio.sleep(0.1)
                    continue
                out.popleft()

    async def _on_inbox(self, msg: Msg) -> None:
        """ "No responders" (NATS status 503) or "gone" for a forwarded message: buffer it instead."""
        seq = int(msg.subject.rpartition(".")[2])
        entry = self._sent.pop(seq, None)  # bounced: not to be re-sent later
        if entry is None:
            return
        _, url, data = entry
        self._sent_bytes -= len(data)
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            self.counters["no_responders"] += 1
        else:
            self.counters["gone"] += 1
        await self.to_buffer(url, data)

    async def to_buffer(self, url: str, data: bytes) -> None:
        """Keep ``data`` in session ``url``'s buffer stream; an unknown session is ``404`` to the sender."""
        sid = session_id(url)
        record = self.records.get(sid)
        if record is None:
            with contextlib.suppress(KeyNotFoundError):
                entry = await self.kv[self.names.sessions].get(sid)
                if entry.value:
                    record = _decode_record(entry.value)
        if record is None:
            self.apply(self.core.undeliverable(data, 404, f"no route: the session {url} no longer exists"))
            return
        if sid in self.session_subs:  # it came back here meanwhile
            actions = self.core.remote_deliver(url, data)
            if actions is not None:
                self.apply(actions)
                return
        assert self.js is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _BUFFER_RETRY_SECONDS
        while True:
            try:
                await self.js.publish(self.names.buffer(sid), data, timeout=self.timeout)
                break
            except Exception as exc:  # a JetStream leader lost with its server: retried while it is re-elected
                if loop.time() < deadline:
                    await asyncio.sleep(0.25)  # nothing announces the new leader to a client
                    continue
                self.counters["buffer_failed"] += 1
                text = f"the session {url} is between nodes and its buffer is unavailable ({exc or type(exc).__name__})"
                self.apply(self.core.undeliverable(data, 503, text))
                return
        self.counters["to_buffer"] += 1
        owner = record.owner
        if owner and owner in self.alive_nodes:  # its node may only have been away from NATS for a moment
            self._tasks.spawn(self._nudge(owner, url), name="buffer nudge")

    async def _nudge(self, owner: str, url: str) -> None:
        """Tell ``owner`` to deliver what waits in ``url``'s buffer (retried while it is reconnecting)."""
        for _ in range(5):
            if self.nc is None:
                return
            try:
                await self.nc.request(self.names.control(owner), _encode({"deliver": url}), timeout=1.0)
                return
            except Exception:  # not back yet (or gone: then a claim replays the buffer)
                await asyncio.sleep(0.2)

    async def _on_resend(self, msg: Msg) -> None:
        """A session's node died and another claimed it: send again what went to it lately (at least once)."""
        try:
            notice = msgspec.json.decode(msg.data)
            url, dead = notice["url"], notice["dead"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return
        seen = self.nodes_seen.get(dead)
        now = time.monotonic()
        # from a heartbeat interval before the dead node's last sign of life (all of the window if unknown)
        since = now - _SENT_SECONDS if seen is None else max(now - _SENT_SECONDS, seen - 2 * self.heartbeat)
        again = [data for when, url_, data in list(self._sent.values()) if url_ == url and when >= since]
        self.counters["resent"] += len(again)
        for data in again:
            self.send_to_session(url, data)

    async def _on_session(self, msg: Msg) -> None:
        url = self.sub_urls.get(msg.subject)
        if url is not None and url in self.claiming:
            self.claiming[url].append(msg.data)
            return
        actions = None if url is None else self.core.remote_deliver(url, msg.data)
        if actions is None:
            if msg.reply:
                await msg.respond(b"gone")
            return
        self.apply(actions)

    async def _on_resource(self, msg: Msg) -> None:
        resource = self.resource_by_subject.get(msg.subject)
        if resource is not None:
            self.apply(self.core.remote_fan_out(resource, msg.data))

    async def hold(self, url: str) -> None:
        """Subscribe to session ``url``'s subject (this node holds it now)."""
        sid = session_id(url)
        if sid in self.session_subs or self.nc is None:
            return
        subject = self.names.session(sid)
        self.sub_urls[subject] = url
        self.session_subs[sid] = await self.nc.subscribe(subject, cb=self._on_session, pending_msgs_limit=100_000)

    async def let_go(self, url: str) -> None:
        sid = session_id(url)
        sub = self.session_subs.pop(sid, None)
        self.sub_urls.pop(self.names.session(sid), None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- what the core tells (Remote) -----------------------------------------------------------------

    def session_changed(self, session: Session, event: str) -> None:
        if self.leaving:  # the graceful stop's hand-over writes the last records itself
            return
        sid = session_id(session.url)
        if event in ("opened", "attached") and sid not in self.session_subs:
            self._tasks.spawn(self.hold(session.url), name="hold session")
        if event == "ended":
            self._dirty[sid] = None
            self._tasks.spawn(self.let_go(session.url), name="let session go")
        else:
            if event == "detached":
                self._detached[sid] = time.time()
            elif event in ("opened", "attached"):
                self._detached.pop(sid, None)
            self._dirty[sid] = session
        self._dirty_event.set()

    def resource_changed(self, resource: str, subscribed: bool) -> None:
        self._tasks.spawn(self._resource(resource, subscribed), name="resource subscription")

    async def _resource(self, resource: str, subscribed: bool) -> None:
        nc = self.nc
        if nc is None:
            return
        key = f"{url_key(resource)}.{self.node_id}"
        bucket = self.kv[self.names.subscriptions]
        subject = self.names.resource(resource)
        if subscribed and resource not in self.resource_subs:
            self.resource_by_subject[subject] = resource
            self.resource_subs[resource] = await nc.subscribe(subject, cb=self._on_resource)
            self.resource_nodes.setdefault(resource, set()).add(self.node_id)
            await self._kv(bucket.put(key, b"1"))
        elif not subscribed and self.core.subscriptions.subscribers(resource) is None:
            sub = self.resource_subs.pop(resource, None)
            self.resource_by_subject.pop(subject, None)
            if sub is not None:
                await sub.unsubscribe()
            await self._kv(bucket.delete(key))

    async def _kv(self, operation: Any) -> Any:
        try:
            return await operation
        except Exception as exc:
            self.counters["kv_errors"] += 1
            self._log.warning("cluster table not updated", error=str(exc) or type(exc).__name__)
            return None

    # -- session records ------------------------------------------------------------------------------

    def record_of(self, session: Session) -> SessionRecord:
        sid = session_id(session.url)
        return SessionRecord(
            url=session.url,
            runtime=session.runtime_url,
            token_hash=token_hash(session.token),
            owner=self.node_id,
            addresses=sorted(session.addresses),
            keys={key: list(block) for key, block in session.keys.items()},
            bound=list(session.bound),
            subscriptions={resource: sorted(sources) for resource, sources in session.subscriptions.items()},
            detached_since=self._detached.get(sid),
        )

    async def _record_writer(self) -> None:
        """Write changed session records one at a time (in order), each a compare-and-swap."""
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            while self._dirty:
                sid, session = next(iter(self._dirty.items()))
                del self._dirty[sid]
                try:
                    if session is None:
                        await self._forget(sid)
                    else:
                        await self._write(sid, session)
                except Exception as exc:  # JetStream busy (a leader re-elected): written again shortly
                    self.counters["kv_errors"] += 1
                    self._log.warning("session record not written yet", error=str(exc) or type(exc).__name__)
                    if not self._closing:
                        self._dirty.setdefault(sid, session)
                        await asyncio.sleep(0.25)

    async def _write(self, sid: str, session: Session) -> None:
        bucket = self.kv[self.names.sessions]
        record = self.record_of(session)
        last = self.revisions.get(sid)
        try:
            if last is None:
                revision = await bucket.create(sid, _encode(record))
            else:
                revision = await bucket.update(sid, _encode(record), last=last)
        except KeyWrongLastSequenceError:
            entry = await bucket.get(sid)
            current = None if entry.value is None else _decode_record(entry.value)
            if current is not None and current.owner == self.node_id and entry.revision is not None:
                self.revisions[sid] = entry.revision  # our own earlier write, whose answer was lost: again
                revision = await bucket.update(sid, _encode(record), last=entry.revision)
            else:  # another node took it over: it is theirs now
                self.revisions.pop(sid, None)
                self.written.pop(sid, None)
                return
        self.revisions[sid] = revision
        self.records[sid] = record
        self.by_runtime[record.runtime] = record.url
        await self._release_addresses(self.written.get(sid), record)
        self.written[sid] = record

    async def _release_addresses(self, before: SessionRecord | None, after: SessionRecord | None) -> None:
        """Delete what ``before`` held and ``after`` no longer does (addresses, allocation keys)."""
        if before is None:
            return
        addresses = set(before.addresses) - set(() if after is None else after.addresses)
        keys = set(before.keys) - set(() if after is None else after.keys)
        for address in addresses:
            await self._delete_owned(self.names.addresses, url_key(address), before.url)
            self.owner_of.pop(address, None)
        for key in keys:
            await self._delete_owned(self.names.keys, url_key(key), before.url)

    async def _delete_owned(self, bucket_name: str, key: str, url: str) -> None:
        """Delete ``key`` if it still names ``url`` (a revision-checked delete: atomic against a new owner)."""
        bucket = self.kv[bucket_name]
        try:
            entry = await bucket.get(key)
        except KeyNotFoundError:
            return
        if entry.value is not None and entry.value.decode() == url and entry.revision is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await bucket.delete(key, last=entry.revision)

    async def _forget(self, sid: str) -> None:
        """A session ended here: delete its record, addresses, keys and buffer."""
        before = self.written.pop(sid, None)
        last = self.revisions.pop(sid, None)
        self._detached.pop(sid, None)
        await self._release_addresses(before, None)
        if last is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.kv[self.names.sessions].delete(sid, last=last)
        assert self.js is not None
        with contextlib.suppress(Exception):
            await self.js.purge_stream(self.names.buffers, subject=self.names.buffer(sid))

    # -- control messages (takeover notices) ------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            notice = msgspec.json.decode(msg.data)
            if "deliver" in notice:
                await self.deliver_buffer(str(notice["deliver"]))
                if msg.reply:
                    await msg.respond(b"delivered")
                return
            url = notice["takeover"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return
        await self.handed(url)
        if msg.reply:
            await msg.respond(b"handed")

    async def handed(self, url: str) -> None:
        """Another node claimed ``url``: let it go here and send it what was buffered for it, in order."""
        sid = session_id(url)
        self.counters["takeovers"] += 1
        self.revisions.pop(sid, None)
        self.written.pop(sid, None)
        self._dirty.pop(sid, None)
        await self.let_go(url)
        actions, frames = self.core.hand_off(url)
        self.apply(actions)
        for frame in frames:
            self.send_to_session(url, frame)

    def claimed(self, sid: str, record: SessionRecord, revision: int) -> None:
        """This node now owns ``sid`` at ``revision`` (set by ``claim.py``)."""
        self.revisions[sid] = revision
        self.written[sid] = record
        self.records[sid] = record


def _unkey(key: str) -> str:
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
