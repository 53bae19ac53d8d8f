"""A node's in-memory copy of the cluster's buckets, kept by KV watchers: routing never waits for NATS.

Every node watches every bucket (addresses, allocation keys, session records, foreign bindings, resource
subscriptions per node, heartbeats) and applies each change to a dictionary here.  A watcher that fails
(NATS trouble) is made again and starts from the bucket's current values, so the copy catches up.  What
the copy has not seen yet (an address just allocated elsewhere) the router looks up in the bucket itself
before it answers ``404``.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.kv import KeyValue

from protofly.msgnode.cluster.names import Names, SessionRecord

__all__ = ["Caches", "unkey"]

_decode_record = msgspec.json.Decoder(SessionRecord).decode


def unkey(key: str) -> str:
    """The URL a NATS key carries (the reverse of ``names.url_key``)."""
    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


class Caches:
    """The watched copies of one domain's buckets (see the module docstring)."""

    def __init__(self, names: Names, log: Any) -> None:
        self.names = names
        self.log = log
        self.owner_of: dict[str, str] = {}  # address -> session URL
        self.records: dict[str, SessionRecord] = {}  # session id -> record
        self.by_runtime: dict[str, str] = {}  # runtime URL -> session URL
        self.bound_to: dict[str, str] = {}  # foreign address bound on the fly -> session URL
        self.key_owner: dict[str, str] = {}  # allocation key -> session URL
        self.resource_nodes: dict[str, set[str]] = {}  # resource -> nodes with subscribers
        self.nodes: dict[str, float] = {}  # node -> last heartbeat seen (loop time)
        self.nodes_seen: dict[str, float] = {}  # node -> last heartbeat seen (monotonic, kept after it leaves)
        self._apply: dict[str, Callable[[str, bytes | None], None]] = {
            names.addresses: self._seen_address,
            names.keys: self._seen_key,
            names.sessions: self._seen_session,
            names.subscriptions: self._seen_subscription,
            names.nodes: self._seen_node,
            names.bound: self._seen_bound,
        }

    @property
    def buckets(self) -> tuple[str, ...]:
        return tuple(self._apply)

    async def watch(self, bucket: KeyValue, name: str, ready: asyncio.Future[None]) -> None:
        """Keep the copy of bucket ``name``; a watcher that fails (NATS trouble) is made again."""
        while True:
            try:
                await self._watch_once(bucket, name, ready)
            except Exception as exc:
                self.log.warning("cluster watcher restarted", bucket=name, error=str(exc) or type(exc).__name__)
            await asyncio.sleep(0.5)  # then watch again from the current values

    async def _watch_once(self, bucket: KeyValue, name: str, ready: asyncio.Future[None]) -> None:
        watcher = await bucket.watchall()
        apply = self._apply[name]
        async for entry in watcher:
            if entry is None:
                if not ready.done():
                    ready.set_result(None)
                continue
            value = None if entry.operation in ("DEL", "PURGE") else entry.value
            try:
                apply(entry.key, value)
            except (msgspec.DecodeError, ValueError) as exc:
                self.log.warning("bad cluster entry", bucket=name, key=entry.key, error=str(exc))

    def _seen_address(self, key: str, value: bytes | None) -> None:
        address = unkey(key)
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

    def _seen_key(self, key: str, value: bytes | None) -> None:
        allocation_key = unkey(key)
        if value is None:
            self.key_owner.pop(allocation_key, None)
        else:
            self.key_owner[allocation_key] = value.decode()

    def _seen_bound(self, key: str, value: bytes | None) -> None:
        address = unkey(key)
        if value is None:
            self.bound_to.pop(address, None)
        else:
            self.bound_to[address] = value.decode()

    def _seen_subscription(self, key: str, value: bytes | None) -> None:
        encoded, _, node = key.rpartition(".")
        resource = unkey(encoded)
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
