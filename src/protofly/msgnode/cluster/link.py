"""One node's link to its domain's cluster: NATS JetStream as the shared tables and the wire between nodes.

:class:`ClusterLink` is the :class:`~protofly.msgnode.remote.Remote` a clustered :class:`MessageNode` plugs
into its core.  What lives in NATS (names in ``names.py``):

* **address ownership** -- KV bucket ``addresses`` (address -> session URL) and ``keys`` (allocationKey ->
  session URL): an allocation *creates* its keys (create-if-absent, atomic in JetStream), so two nodes
  racing for one allocationKey get one owner; release deletes them;
* **session records** -- KV bucket ``sessions`` (:class:`SessionRecord`: runtime URL, token hash, owner node,
  addresses, bindings, subscriptions, detached-since), written only by the owner (``records.py``, which also
  expires sessions orphaned by a dead node), each write a compare-and-swap on its last revision;
* **foreign bindings** -- KV bucket ``bound`` (another domain's hyperty a session speaks for -> session URL);
* **routing** -- each node subscribes to one subject per session it holds; a message for a session on
  another node is published there, acknowledged by the node that takes it, retried when no acknowledgement
  comes, and sent to the session's **buffer** (stream ``BUFFERS``) when nobody holds it (``forward.py``);
* **subscriptions** -- one subject per resource, subscribed once per node with subscribers (bucket
  ``subscriptions`` says which nodes): a publication is one NATS publish, fanned out by each node;
* **liveness** -- every node puts a heartbeat in bucket ``nodes`` (bucket-wide TTL: nats-server 2.9 has no
  per-key TTL).

Every node copies the buckets through KV watchers (``caches.py``), so routing decisions are dictionary
look-ups on the loop; NATS I/O is queued to the link's own tasks.  ``claim.py`` takes sessions over and
hands them on.
"""

from __future__ import annotations

import asyncio
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
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from protofly.log import get_logger
from protofly.msgnode.actions import Action
from protofly.msgnode.cluster.caches import Caches
from protofly.msgnode.cluster.forward import Forwarder
from protofly.msgnode.cluster.names import Names, SessionRecord, session_id, url_key
from protofly.msgnode.cluster.records import RecordKeeper
from protofly.msgnode.core import MessageNodeCore
from protofly.msgnode.session import Session
from protofly.tasks import TaskSet

__all__ = ["ClusterLink"]

_log = get_logger("protofly.msgnode.cluster")
_encode = msgspec.json.encode
#: A foreign address unknown to the cache is looked up this often, this far apart, before a 404: the
#: binding's write (by the node its sender spoke through) may still be on its way.
_BOUND_TRIES = 3
_BOUND_RETRY_DELAY = 0.1


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
        ack_timeout: float = 1.0,
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
        self.log = _log.bind(domain=core.domain, node=self.node_id)
        # copies of the buckets, kept by watchers (``caches.py``)
        self.caches = caches = Caches(self.names, self.log)
        self.owner_of = caches.owner_of
        self.records = caches.records
        self.by_runtime = caches.by_runtime
        self.bound_to = caches.bound_to
        self.key_owner = caches.key_owner
        self.resource_nodes = caches.resource_nodes
        self.nodes = caches.nodes
        self.nodes_seen = caches.nodes_seen
        # what this node holds
        self.session_subs: dict[str, Subscription] = {}  # session id -> subscription
        self.sub_urls: dict[str, str] = {}  # subject -> session URL
        self.buffer_subs: dict[str, Subscription] = {}  # session id -> subscription to its buffer subject
        self.buffer_urls: dict[str, str] = {}  # buffer subject -> session URL
        self.resource_subs: dict[str, Subscription] = {}  # resource -> subscription
        self.resource_by_subject: dict[str, str] = {}
        #: Sessions being claimed here: what arrives for them before the claim completes waits here.
        self.claiming: dict[str, list[bytes]] = {}
        self.tasks = TaskSet("msgnode-cluster")
        self.closing = False
        #: Set by the graceful stop's hand-over: no more record writes of its own.
        self.leaving = False
        self.forwarder = Forwarder(self, ack_timeout=ack_timeout)
        self.keeper = RecordKeeper(self)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, make sure the buckets and the buffer stream exist, load the caches, start heartbeats."""
        self.nc = await asyncio.wait_for(self._connect(), timeout=2 * self.timeout)
        self.js = self.nc.jetstream(timeout=self.timeout)
        names = self.names
        for bucket in (names.addresses, names.keys, names.sessions, names.subscriptions, names.bound):
            self.kv[bucket] = await self._bucket(bucket)
        self.kv[names.nodes] = await self._bucket(names.nodes, ttl=max(3 * self.heartbeat, 1.0))
        await self._setup(self._buffer_stream)
        await self._setup(self._beat)
        watched = self.caches.buckets
        ready = [asyncio.get_running_loop().create_future() for _ in watched]
        for bucket, future in zip(watched, ready, strict=True):
            self.tasks.spawn(self.caches.watch(self.kv[bucket], bucket, future), name=f"watch {bucket}")
        await asyncio.wait_for(asyncio.gather(*ready), timeout=self.timeout)
        await self.nc.subscribe(names.control(self.node_id), cb=self._on_control)
        await self.nc.subscribe(names.resend, cb=self.forwarder.on_resend)
        await self.nc.subscribe(names.inbox(self.node_id) + ".*", cb=self.forwarder.on_inbox)
        self.forwarder.start()
        self.keeper.start()
        self.tasks.spawn(self._heartbeats(), name="cluster heartbeats")
        self.log.info("cluster joined", servers=",".join(self.servers), nodes=len(self.nodes))

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
        self.log.info("nats reconnected")
        self.forwarder.reconnected()
        for url in list(self.sub_urls.values()):
            self.tasks.spawn(self.forwarder.deliver_buffer(url), name="deliver buffer")

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
        self.closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), timeout=self.timeout)
        with contextlib.suppress(Exception):
            await self.kv[self.names.nodes].delete(self.node_id)
        await self.tasks.close(timeout=1)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), timeout=self.timeout)
            self.nc = None

    async def _flush(self) -> None:
        """Wait (bounded by the caller) until the publish queue and the record writes are done."""
        while self.forwarder.busy or self.keeper.dirty:  # noqa: ASYNC110 - the writers signal nothing back; the queues are short
            await asyncio.sleep(0.01)
        if self.nc is not None:
            await self.nc.flush(timeout=int(self.timeout))

    async def _nats_error(self, exc: Exception) -> None:
        self.log.warning("nats", error=str(exc) or type(exc).__name__)

    @property
    def nats_port(self) -> int:
        """The port of the NATS server this node is connected to now (0 while it is not): for operators."""
        nc = self.nc
        url = None if nc is None or not nc.is_connected else nc.connected_url
        return 0 if url is None or url.port is None else url.port

    @property
    def alive_nodes(self) -> list[str]:
        now = asyncio.get_running_loop().time()
        limit = max(3 * self.heartbeat, 1.0)
        return sorted(node for node, seen in self.nodes.items() if now - seen <= limit)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self._beat()
            except Exception as exc:  # NATS unreachable for now: the next beat retries
                self.counters["kv_errors"] += 1
                self.log.warning("heartbeat not written", error=str(exc) or type(exc).__name__)

    async def _beat(self) -> None:
        await self.kv[self.names.nodes].put(self.node_id, _encode({"t": time.time()}))

    # -- routing (Remote) ---------------------------------------------------------------------------

    def session_url_of(self, to: str) -> str | None:
        """The session URL ``to`` routes to anywhere in the cluster (address allocated or bound, runtime URL)."""
        url = self.owner_of.get(to) or self.bound_to.get(to)
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
            ours = self._domain_part in to
            if (not ours and not to.startswith("hyperty://")) or to in self.resource_nodes:
                return False  # neither an address of this domain nor a bindable one, or a subscribed resource
            if self.core.subscriptions.subscribers(to):
                return False
            # an address unknown to the cache (just allocated or bound, or a watcher catching up after NATS
            # trouble): ask the tables themselves before answering 404
            self.tasks.spawn(self._look_up(to, data), name="address look-up")
            return True
        sid = session_id(url)
        record = self.records.get(sid)
        if record is not None and record.owner == self.node_id and sid in self.session_subs:
            return False  # stale: this node would have found it in its own tables
        self.forwarder.send_to_session(url, data)
        return True

    async def _look_up(self, to: str, data: bytes) -> None:
        ours = self._domain_part in to
        try:
            url = await self._get(self.names.addresses, to) if ours else None
            for attempt in range(_BOUND_TRIES):
                if url is not None:
                    break
                url = await self._get(self.names.bound, to)
                if url is None and (ours or attempt == _BOUND_TRIES - 1):
                    break
                if url is None:
                    await asyncio.sleep(_BOUND_RETRY_DELAY)  # nothing announces another node's write
        except Exception as exc:
            self.counters["kv_errors"] += 1
            self.apply(self.core.undeliverable(data, 503, f"no route to {to} now: the cluster is unavailable ({exc})"))
            return
        if url is None:
            text = f"no route to {to}: not an allocated address, runtime or subscribed resource in {self.core.domain}"
            self.apply(self.core.undeliverable(data, 404, text))
            return
        actions = self.core.remote_deliver(url, data)  # it may be ours after all
        if actions is not None:
            self.apply(actions)
        else:
            self.forwarder.send_to_session(url, data)

    async def _get(self, bucket: str, address: str) -> str | None:
        try:
            entry = await self.kv[bucket].get(url_key(address))
        except KeyNotFoundError:
            return None
        return None if entry.value is None else entry.value.decode()

    def send_to_session(self, url: str, data: bytes) -> None:
        self.forwarder.send_to_session(url, data)

    def fan_out(self, resource: str, data: bytes) -> bool:
        nodes = self.resource_nodes.get(resource)
        if not nodes or nodes == {self.node_id}:
            return False
        self.forwarder.queue(self.names.resource(resource), data, "")
        return True

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
        self.session_subs[sid] = await self.nc.subscribe(
            subject, cb=self.forwarder.on_session, pending_msgs_limit=100_000
        )
        # what another node writes to the session's buffer stream is seen here too (core NATS, at most
        # once): a prompt to deliver it, on top of the writer's nudge
        buffer = self.names.buffer(sid)
        self.buffer_urls[buffer] = url
        self.buffer_subs[sid] = await self.nc.subscribe(buffer, cb=self._on_buffered)

    async def _on_buffered(self, msg: Msg) -> None:
        url = self.buffer_urls.get(msg.subject)
        if url is not None:
            self.tasks.spawn(self.forwarder.deliver_buffer(url), name="deliver buffer")

    async def let_go(self, url: str) -> None:
        sid = session_id(url)
        self.sub_urls.pop(self.names.session(sid), None)
        self.buffer_urls.pop(self.names.buffer(sid), None)
        for sub in (self.session_subs.pop(sid, None), self.buffer_subs.pop(sid, None)):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    # -- what the core tells (Remote) -----------------------------------------------------------------

    def session_changed(self, session: Session, event: str) -> None:
        if self.leaving:  # the graceful stop's hand-over writes the last records itself
            return
        sid = session_id(session.url)
        if event in ("opened", "attached") and sid not in self.session_subs:
            self.tasks.spawn(self.hold(session.url), name="hold session")
        if event == "ended":
            self.keeper.changed(sid, None)
            self.tasks.spawn(self.let_go(session.url), name="let session go")
        else:
            if event == "detached":
                self.keeper.detached[sid] = time.time()
            elif event in ("opened", "attached"):
                self.keeper.detached.pop(sid, None)
            self.keeper.changed(sid, session)

    def resource_changed(self, resource: str, subscribed: bool) -> None:
        self.tasks.spawn(self._resource(resource, subscribed), name="resource subscription")

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
            self.log.warning("cluster table not updated", error=str(exc) or type(exc).__name__)
            return None

    # -- records (``records.py``) -----------------------------------------------------------------------

    @property
    def revisions(self) -> dict[str, int]:
        return self.keeper.revisions

    def record_of(self, session: Session) -> SessionRecord:
        return self.keeper.record_of(session)

    def claimed(self, sid: str, record: SessionRecord, revision: int) -> None:
        self.keeper.claimed(sid, record, revision)

    # -- control messages (takeover notices) ------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        try:
            notice = msgspec.json.decode(msg.data)
            if "deliver" in notice:
                if not await self.forwarder.deliver_buffer(str(notice["deliver"])):
                    return  # unread: no answer, so the nudging node asks again
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
        self.keeper.handed(sid)
        await self.let_go(url)
        actions, frames = self.core.hand_off(url)
        self.apply(actions)
        for frame in frames:
            self.forwarder.send_to_session(url, frame)
