"""Session records in the cluster's tables: written by their owner, expired by a survivor when orphaned.

* **writes** -- a session's record (bucket ``sessions``) is rewritten when it changes here, one at a time
  and in order, each a compare-and-swap on the revision this node last wrote: a node that lost a session to
  a ``re-open`` elsewhere learns it there and stops.  Addresses, allocation keys and foreign bindings the
  session no longer holds are deleted with a revision check (never a newer owner's entry).  A session's
  foreign bindings (``hyperty://`` senders of other domains it spoke for) are put in bucket ``bound``, so a
  reply to one of them routes from any node.
* **orphans** -- a session whose owner is gone (no heartbeat, or ``""`` after a graceful stop) and that no
  stub re-claims within the node's ``session_grace`` is expired by a surviving node: the record is deleted
  with a revision check, so exactly one survivor (or a racing ``re-open``) wins; the winner releases its
  addresses, keys and bindings and deletes its buffer stream's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from protofly.msgnode.cluster.buffers import drop_buffer
from protofly.msgnode.cluster.names import SessionRecord, session_id, token_hash, url_key
from protofly.msgnode.cluster.view import Link
from protofly.msgnode.session import Session

__all__ = ["RecordKeeper"]

_decode_record = msgspec.json.Decoder(SessionRecord).decode
_encode = msgspec.json.encode


class RecordKeeper:
    """This node's session records and the orphan sweep (see the module docstring)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.revisions: dict[str, int] = {}  # session id -> revision this node last wrote
        self.written: dict[str, SessionRecord] = {}
        self.dirty: dict[str, Session | None] = {}
        self.detached: dict[str, float] = {}  # session id -> wall-clock time its socket went
        self._dirty_event = asyncio.Event()
        #: Sessions seen without a live owner: session id -> (monotonic time first seen so, owner then).
        self._orphans: dict[str, tuple[float, str]] = {}
        link.counters.update(dict.fromkeys(("orphans_expired",), 0))

    def start(self) -> None:
        self.link.tasks.spawn(self._writer(), name="cluster records")
        self.link.tasks.spawn(self._sweep(), name="cluster orphan sweep")

    def changed(self, sid: str, session: Session | None) -> None:
        """Write ``session``'s record soon (None: it ended here, delete it)."""
        self.dirty[sid] = session
        self._dirty_event.set()

    def record_of(self, session: Session) -> SessionRecord:
        sid = session_id(session.url)
        return SessionRecord(
            url=session.url,
            runtime=session.runtime_url,
            token_hash=token_hash(session.token),
            owner=self.link.node_id,
            addresses=sorted(session.addresses),
            keys={key: list(block) for key, block in session.keys.items()},
            bound=list(session.bound),
            subscriptions={resource: sorted(sources) for resource, sources in session.subscriptions.items()},
            detached_since=self.detached.get(sid),
        )

    def claimed(self, sid: str, record: SessionRecord, revision: int) -> None:
        """This node now owns ``sid`` at ``revision`` (set by ``claim.py``)."""
        self.revisions[sid] = revision
        self.written[sid] = record
        self.link.records[sid] = record

    def handed(self, sid: str) -> None:
        """Another node owns ``sid`` now: no more writes of ours."""
        self.revisions.pop(sid, None)
        self.written.pop(sid, None)
        self.dirty.pop(sid, None)

    # -- writes ---------------------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Write changed session records one at a time (in order), each a compare-and-swap."""
        link = self.link
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            while self.dirty:
                sid, session = next(iter(self.dirty.items()))
                del self.dirty[sid]
                try:
                    if session is None:
                        await self._forget(sid)
                    else:
                        await self._write(sid, session)
                except Exception as exc:  # JetStream busy (a leader re-elected): written again shortly
                    link.counters["kv_errors"] += 1
                    link.log.warning("session record not written yet", error=str(exc) or type(exc).__name__)
                    if not link.closing:
                        self.dirty.setdefault(sid, session)
                        await asyncio.sleep(0.25)

    async def _write(self, sid: str, session: Session) -> None:
        link = self.link
        bucket = link.kv[link.names.sessions]
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
            if current is not None and current.owner == link.node_id and entry.revision is not None:
                self.revisions[sid] = entry.revision  # our own earlier write, whose answer was lost: again
                revision = await bucket.update(sid, _encode(record), last=entry.revision)
            else:  # another node took it over (or a survivor expired it): it is not ours any more
                self.revisions.pop(sid, None)
                self.written.pop(sid, None)
                return
        self.revisions[sid] = revision
        link.records[sid] = record
        link.by_runtime[record.runtime] = record.url
        before = self.written.get(sid)
        new_bound = set(record.bound) - set(() if before is None else before.bound)
        bound = link.kv[link.names.bound]
        for address in new_bound:
            await bound.put(url_key(address), record.url.encode())
            link.bound_to[address] = record.url
        await self.release(before, record)
        self.written[sid] = record

    async def release(self, before: SessionRecord | None, after: SessionRecord | None) -> None:
        """Delete what ``before`` held and ``after`` no longer does (addresses, allocation keys, bindings)."""
        if before is None:
            return
        link = self.link
        names = link.names
        addresses = set(before.addresses) - set(() if after is None else after.addresses)
        keys = set(before.keys) - set(() if after is None else after.keys)
        bound = set(before.bound) - set(() if after is None else after.bound)
        if after is None:  # all of it: also what the tables name it for and its record did not list yet
            url = before.url  # (a node killed between an allocation and the record's update)
            addresses.update(address for address, owner in list(link.owner_of.items()) if owner == url)
            keys.update(key for key, owner in list(link.key_owner.items()) if owner == url)
            bound.update(address for address, owner in list(link.bound_to.items()) if owner == url)
        for address in addresses:
            await self._delete_owned(names.addresses, url_key(address), before.url)
            link.owner_of.pop(address, None)
        for key in keys:
            await self._delete_owned(names.keys, url_key(key), before.url)
        for address in bound:
            await self._delete_owned(names.bound, url_key(address), before.url)
            if link.bound_to.get(address) == before.url:
                del link.bound_to[address]

    async def _delete_owned(self, bucket_name: str, key: str, url: str) -> None:
        """Delete ``key`` if it still names ``url`` (a revision-checked delete: atomic against a new owner)."""
        bucket = self.link.kv[bucket_name]
        try:
            entry = await bucket.get(key)
        except KeyNotFoundError:
            return
        if entry.value is not None and entry.value.decode() == url and entry.revision is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await bucket.delete(key, last=entry.revision)

    async def _forget(self, sid: str) -> None:
        """A session ended here: delete its record, addresses, keys, bindings and buffer."""
        link = self.link
        before = self.written.pop(sid, None)
        last = self.revisions.pop(sid, None)
        self.detached.pop(sid, None)
        await self.release(before, None)
        if last is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await link.kv[link.names.sessions].delete(sid, last=last)
        await self._purge_buffer(sid)

    async def _purge_buffer(self, sid: str) -> None:
        """The session is gone: what waited in its buffer stream is a ``404`` to each sender, then deleted."""
        await drop_buffer(self.link, sid)

    # -- orphans --------------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Look for orphaned sessions every heartbeat; expire those orphaned longer than the grace."""
        link = self.link
        while True:
            await asyncio.sleep(link.heartbeat)
            if link.leaving or link.closing:
                continue
            try:
                await self.sweep_once()
            except Exception as exc:  # NATS trouble: the next sweep looks again
                link.counters["kv_errors"] += 1
                link.log.warning("orphan sweep failed", error=str(exc) or type(exc).__name__)

    async def sweep_once(self) -> None:
        link = self.link
        alive = set(link.alive_nodes)
        if link.node_id not in alive:
            return  # we are the one cut off (no heartbeat of ours seen): judge nobody
        now = time.monotonic()
        grace = max(link.core.session_grace, 0.0)
        orphans = self._orphans
        for sid in [sid for sid in orphans if sid not in link.records]:
            del orphans[sid]
        for sid, record in list(link.records.items()):
            if record.owner in alive:
                orphans.pop(sid, None)
                continue
            since, owner = orphans.get(sid, (now, record.owner))
            if owner != record.owner:  # claimed and orphaned again: its clock starts again
                since = now
            orphans[sid] = (since, record.owner)
            if now - since >= grace:
                await self._expire(sid, record.owner)

    async def _beating(self, node: str) -> bool:
        """Does ``node``'s heartbeat stand in the bucket now?  The server expires it (the bucket's TTL), so
        this does not depend on how soon this node's watcher saw the last one."""
        link = self.link
        try:
            entry = await link.kv[link.names.nodes].get(node)
        except KeyNotFoundError:
            return False
        return entry.value is not None

    async def _expire(self, sid: str, owner: str) -> None:
        """Delete orphan ``sid``'s record by compare-and-swap; the one node that wins releases the rest."""
        link = self.link
        bucket = link.kv[link.names.sessions]
        self._orphans.pop(sid, None)
        try:
            entry = await bucket.get(sid)
        except KeyNotFoundError:
            return
        if entry.value is None or entry.revision is None:
            return
        record = _decode_record(entry.value)
        if record.owner != owner:
            return  # re-claimed meanwhile
        if owner and await self._beating(owner):
            return  # its node lives: our copy of the heartbeats lagged (a busy loop), not its node
        try:
            await bucket.delete(sid, last=entry.revision)
        except KeyWrongLastSequenceError:
            return  # another survivor expired it, or a stub re-claimed it: not ours to finish
        try:  # counted once what it held is free: a reader of the counter may take its addresses and key at once
            await self.release(record, None)
            await self._purge_buffer(sid)
        finally:
            link.counters["orphans_expired"] += 1
            link.log.info("orphaned session expired", session=sid, owner=owner or "(none)")
