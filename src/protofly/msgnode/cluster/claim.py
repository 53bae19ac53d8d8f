"""The round trips a clustered node makes before it answers: allocations, claims of sessions, hand-over.

* :func:`allocate` -- an allocation's addresses (and allocationKey) are *created* in the shared buckets
  (create-if-absent): of two sessions racing for one allocationKey on two nodes, one creates it and the
  other gets ``409``.  Only then does the core answer ``200``: once a hyperty holds an address, every node
  can route to it.
* :func:`claim` -- ``re-open`` of a session this node does not hold: its record is read, the token checked
  against the record's hash, the owner swapped to this node by compare-and-swap on the record's revision
  (of two nodes claiming at once, one wins), the session subject subscribed *before* the buffer is read (so
  nothing falls between), the old owner told (it closes its socket with 4000 and forwards what it
  buffered), then the buffer stream's messages are replayed after the ``200``.
* :func:`hand_over` -- a graceful stop: every session still held is detached by the drain; its buffered
  messages go to its buffer stream and its record says "no owner", so the stub's ``re-open`` on another
  node finds everything.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from protofly.message import Message
from protofly.msgnode.actions import Allocate, Claim, Refused
from protofly.msgnode.cluster.buffers import take_buffer
from protofly.msgnode.cluster.names import SessionRecord, session_id, token_hash, url_key
from protofly.msgnode.cluster.view import Link
from protofly.msgnode.session import Session

__all__ = ["allocate", "claim", "hand_over"]

_decode_record = msgspec.json.Decoder(SessionRecord).decode
#: Transient JetStream failures (a server lost, a leader re-elected) are retried this often, this far apart.
_TRIES = 20
_RETRY_DELAY = 0.5


async def allocate(link: Link, action: Allocate) -> None:
    """Carry out an :class:`Allocate`: create the key and the addresses, then let the core answer."""
    msg: Message = action.msg
    refused: Refused | None = None
    for attempt in range(_TRIES):  # a NATS server just lost: the client reconnects, JetStream re-elects
        refused = await _allocate_once(link, action)
        if refused is None or refused.code != 503 or attempt == _TRIES - 1:
            break
        await asyncio.sleep(_RETRY_DELAY)  # nothing announces JetStream's recovery to a client
    link.apply(link.core.allocated(action.conn, msg, action.addresses, action.key, refused))


async def _allocate_once(link: Link, action: Allocate) -> Refused | None:
    names = link.names
    refused: Refused | None = None
    try:
        if action.key is not None:
            keys = link.kv[names.keys]
            try:
                await keys.create(url_key(action.key), action.session.encode())
            except KeyWrongLastSequenceError:
                entry = await keys.get(url_key(action.key))
                holder = b"" if entry.value is None else entry.value
                if holder.decode() != action.session:
                    refused = Refused(409, f"allocationKey {action.key!r} is held by another session of this domain")
        if refused is None:
            bucket = link.kv[names.addresses]
            value = action.session.encode()
            await asyncio.gather(*(bucket.create(url_key(address), value) for address in action.addresses))
            for address in action.addresses:
                link.owner_of[address] = action.session
    except KeyWrongLastSequenceError:
        refused = Refused(409, "an address of this allocation exists already: retry")
    except Exception as exc:
        link.counters["kv_errors"] += 1
        refused = Refused(503, f"the cluster's address table is unavailable ({exc or type(exc).__name__}): retry")
    return refused


async def claim(link: Link, action: Claim) -> None:
    """Carry out a :class:`Claim` (``re-open`` of a session held elsewhere, or by nobody)."""
    msg: Message = action.msg
    url = msg.from_
    core = link.core
    sid = session_id(url)
    bucket = link.kv[link.names.sessions]
    unknown = f"re-open: unknown session {url} (closed, expired or the node restarted): send 'open' for a new session"
    for _ in range(3):  # a record rewritten meanwhile (its owner still writing): read it again
        try:
            entry = await bucket.get(sid)
        except KeyNotFoundError:
            link.apply(core.claim_failed(action.conn, msg, 404, unknown))
            return
        except Exception as exc:
            link.apply(core.claim_failed(action.conn, msg, 503, f"re-open: the cluster is unavailable ({exc}): retry"))
            return
        if entry.value is None or entry.revision is None:
            link.apply(core.claim_failed(action.conn, msg, 404, unknown))
            return
        record = _decode_record(entry.value)
        token = url[len(record.runtime) + 1 :]
        if record.url != url or token_hash(token) != record.token_hash:
            link.apply(core.claim_failed(action.conn, msg, 404, unknown))
            return
        previous = record.owner
        mine = msgspec.structs.replace(record, owner=link.node_id, detached_since=None)
        try:
            revision = await bucket.update(sid, msgspec.json.encode(mine), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        break
    else:
        link.apply(core.claim_failed(action.conn, msg, 409, f"re-open: {url} is being re-opened elsewhere: retry"))
        return
    link.claimed(sid, mine, revision)
    link.claiming[url] = []
    try:
        await link.hold(url)
        dead = None
        if previous and previous != link.node_id and link.nc is not None:
            dead = await _take_over(link, previous, url)
        frames = await take_buffer(link, sid)
    finally:
        early = link.claiming.pop(url, [])
    session = Session(
        runtime_url=record.runtime,
        token=token,
        url=url,
        addresses=set(record.addresses),
        keys={key: list(block) for key, block in record.keys.items()},
        bound=dict.fromkeys(record.bound),
        subscriptions={resource: set(sources) for resource, sources in record.subscriptions.items()},
        subscription_count=sum(len(sources) for sources in record.subscriptions.values()),
    )
    seen = (msg.body or {}).get("received")
    if type(seen) is int and seen > 0:  # acknowledged delivery: number on from what the runtime already has
        session.sent = seen
    link.apply(core.adopt(action.conn, msg, session, frames + early))
    if dead is not None and link.nc is not None:  # what the dead node had in flight: sent again by its senders
        await link.nc.publish(link.names.resend, msgspec.json.encode({"url": url, "dead": dead}))


async def _take_over(link: Link, previous: str, url: str) -> str | None:
    """Tell the previous owner; it closes its socket and forwards its buffer.  Returns it if it is dead."""
    assert link.nc is not None
    try:
        await link.nc.request(link.names.control(previous), msgspec.json.encode({"takeover": url}), timeout=1.0)
    except Exception:  # no responders (its connection is gone) or no answer: it died holding the session
        return previous
    return None


async def hand_over(link: Link) -> int:
    """At a graceful stop (after the drain): every session held here goes to its buffer stream, no owner."""
    core = link.core
    js = link.js
    assert js is not None
    bucket = link.kv[link.names.sessions]
    link.leaving = True
    count = 0
    for session in list(core.sessions):
        sid = session_id(session.url)
        await link.let_go(session.url)
        last = link.revisions.get(sid)
        if last is None:  # already claimed by another node
            continue
        for frame in session.take_buffer():
            await js.publish(link.names.buffer(sid), frame, timeout=link.timeout)
        record = msgspec.structs.replace(link.record_of(session), owner="")
        for _ in range(3):  # a record write of ours may have been under way: read it back and retry
            try:
                await bucket.update(sid, msgspec.json.encode(record), last=last)
                count += 1
                break
            except KeyWrongLastSequenceError:
                entry = await bucket.get(sid)
                current = None if entry.value is None else _decode_record(entry.value)
                if current is None or current.owner != link.node_id or entry.revision is None:
                    break  # claimed by another node meanwhile: it is theirs
                last = entry.revision
        link.revisions.pop(sid, None)
    return count
