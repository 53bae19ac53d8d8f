"""Messages between the nodes of a cluster: published to a session's subject, acknowledged, never dropped.

Core NATS is at most once: a message published while the server a node is connected to dies (on the
sender's side or the receiver's) can vanish without a trace, and a session subject with no subscriber
answers "no responders".  So a message forwarded to a session on another node is tracked until its fate
is known, and every fate is explicit:

* **acknowledged** -- the receiving node acknowledges what it took (in batches: one publish per sending
  node every 10 ms at most, ``<inbox>.ack`` carrying sequence numbers);
* **bounced** -- "no responders" (nobody holds the session: its node died or is reconnecting) or ``gone``
  (the node no longer holds it): the message goes to the session's **buffer stream** (JetStream, publish
  acknowledged; retried while a leader is re-elected), and the owner is nudged to deliver it; a session
  that no longer exists is a ``404`` to the sender, a buffer that stays unavailable a ``503``;
* **silence** -- neither within ``ack_timeout``: the message is published again under the same sequence
  number (the receiver drops what it already took, so a retry never delivers twice), and after
  ``give_up`` seconds it goes to the buffer stream as if bounced.

What this node forwarded lately stays in a window (count, bytes and age bounded) after its acknowledgement:
a node that took messages and died before its socket wrote them loses them with it, and the node that
claims the session asks every sender to send that window again (``resend``: at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from protofly.msgnode.cluster.buffers import BUFFER_ID, drop_buffer, take_buffer
from protofly.msgnode.cluster.names import SessionRecord, session_id
from protofly.msgnode.cluster.view import Link

__all__ = ["Forwarder"]

_decode_record = msgspec.json.Decoder(SessionRecord).decode
_encode = msgspec.json.encode
#: Forwarded messages kept for a re-send after their node died: at most this many, bytes, seconds.
_SENT_MAX = 100_000
_SENT_BYTES = 64 << 20
_SENT_SECONDS = 5.0
#: Unacknowledged forwards: at most this many (beyond, the oldest goes to its buffer stream at once).
_UNACKED_MAX = 100_000
#: How long the receiving node gathers acknowledgements before it sends them (well under the ack timeout).
_ACK_DELAY = 0.01
#: Sequence numbers of messages taken from other nodes, remembered to drop their retries.
_SEEN_MAX = 200_000
#: How long a message bound for a buffer stream waits for JetStream (a leader re-elected) before a 503.
_BUFFER_RETRY_SECONDS = 20.0


class Forwarder:
    """The wire between this node and the others' sessions (see the module docstring)."""

    def __init__(self, link: Link, *, ack_timeout: float = 1.0, give_up: float = 10.0) -> None:
        self.link = link
        self.ack_timeout = ack_timeout
        self.give_up = give_up
        self.counters = link.counters
        self.counters.update(dict.fromkeys(("acked", "retried", "duplicates", "unacked_buffered"), 0))
        self._out: collections.deque[tuple[str, bytes, str]] = collections.deque()
        self._out_event = asyncio.Event()
        #: Forward numbers start at the wall clock in µs: a node restarted under the same ``--node-id`` does
        #: not reuse numbers the other nodes remember having taken (they would drop its messages as repeats).
        self._seq = time.time_ns() // 1000
        #: Forwarded lately, by sequence number: (monotonic time, session URL, data), for ``resend``.
        self._sent: dict[int, tuple[float, str, bytes]] = {}
        self._sent_bytes = 0
        #: Not yet acknowledged nor bounced, oldest first: seq -> (first sent, next retry due, tries, URL, data).
        self._unacked: dict[int, tuple[float, float, int, str, bytes]] = {}
        #: Taken from other nodes (their reply subject): a retry of one of them is acknowledged, not delivered.
        self._seen: dict[str, None] = {}
        #: Acknowledgements to send, by the sending node's inbox.
        self._acks: dict[str, list[str]] = {}
        self._delivering: dict[str, asyncio.Lock] = {}  # session URL -> one reader of its buffer at a time

    @property
    def inbox(self) -> str:
        return self.link.names.inbox(self.link.node_id)

    def start(self) -> None:
        tasks = self.link.tasks
        tasks.spawn(self._writer(), name="cluster publisher")
        tasks.spawn(self._retrier(), name="cluster retries")

    @property
    def busy(self) -> bool:
        """Publishes still queued here (a graceful stop waits for them)."""
        return bool(self._out)

    # -- sending ------------------------------------------------------------------------------------

    def send_to_session(self, url: str, data: bytes) -> None:
        """Publish ``data`` to session ``url``'s subject, tracked until acknowledged or bounced."""
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
        unacked = self._unacked
        if len(unacked) >= _UNACKED_MAX:
            oldest = next(iter(unacked))
            _, _, _, old_url, old_data = unacked.pop(oldest)
            self.counters["unacked_buffered"] += 1
            self.link.tasks.spawn(self.to_buffer(old_url, old_data, f"{self.inbox}.{oldest}"), name="to buffer")
        unacked[seq] = (now, now + self.ack_timeout, 0, url, data)
        self.queue(self.link.names.session(session_id(url)), data, f"{self.inbox}.{seq}")

    def queue(self, subject: str, data: bytes, reply: str) -> None:
        self._out.append((subject, data, reply))
        self.counters["published"] += 1
        if not self._out_event.is_set():
            self._out_event.set()

    async def _writer(self) -> None:
        """Every queued publish, in order, from one task (nats-py publishes are coroutines)."""
        out = self._out
        log = self.link.log
        while True:
            await self._out_event.wait()
            self._out_event.clear()
            nc = self.link.nc
            if nc is None:
                return
            while out:
                subject, data, reply = out[0]
                try:
                    await nc.publish(subject, data, reply=reply)
                except Exception as exc:  # disconnected beyond the client's reconnect buffer: retry shortly
                    log.warning("publish failed, retrying", error=str(exc) or type(exc).__name__)
                    await asyncio.sleep(0.1)
                    continue
                out.popleft()

    def reconnected(self) -> None:
        """Back on NATS: what waited in the client's buffer goes out now; its acknowledgements get their time."""
        now = time.monotonic()
        unacked = self._unacked
        for seq, (first, _, tries, url, data) in list(unacked.items()):
            unacked[seq] = (first, now + self.ack_timeout, tries, url, data)

    async def _retrier(self) -> None:
        """Publish again what nobody acknowledged in time; after ``give_up``, buffer it.

        Not while this node is off NATS itself: what it published meanwhile waits in the client's buffer.
        """
        unacked = self._unacked
        subject_of = self.link.names.session
        while True:
            await asyncio.sleep(self.ack_timeout / 4)
            nc = self.link.nc
            if nc is None or not nc.is_connected:
                continue
            now = time.monotonic()
            late = [seq for seq, entry in unacked.items() if entry[1] <= now]
            for seq in late:
                first, _, tries, url, data = unacked.pop(seq)
                if now - first >= self.give_up:
                    self.counters["unacked_buffered"] += 1
                    self.link.tasks.spawn(self.to_buffer(url, data, f"{self.inbox}.{seq}"), name="to buffer")
                    continue
                # to the end (the oldest stay first), the next retry later each time: no storm when acks are slow
                unacked[seq] = (first, now + self.ack_timeout * 2 ** min(tries + 1, 3), tries + 1, url, data)
                self.counters["retried"] += 1
                self.queue(subject_of(session_id(url)), data, f"{self.inbox}.{seq}")

    # -- answers to what we sent ------------------------------------------------------------------------

    async def on_inbox(self, msg: Msg) -> None:
        """Acknowledgements; "no responders" (NATS status 503) or ``gone``: the message goes to a buffer."""
        tail = msg.subject.rpartition(".")[2]
        if tail == "ack":
            unacked = self._unacked
            for number in msg.data.split(b","):
                with contextlib.suppress(ValueError):
                    if unacked.pop(int(number), None) is not None:
                        self.counters["acked"] += 1
            return
        try:
            seq = int(tail)
        except ValueError:
            return
        pending = self._unacked.pop(seq, None)
        entry = self._sent.pop(seq, None)  # bounced: not to be re-sent later
        if entry is not None:
            self._sent_bytes -= len(entry[2])
        if pending is None:
            return  # acknowledged meanwhile (a retry bounced after the first copy arrived), or buffered
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            self.counters["no_responders"] += 1
        else:
            self.counters["gone"] += 1
        await self.to_buffer(pending[3], pending[4], f"{self.inbox}.{seq}")

    # -- what other nodes send --------------------------------------------------------------------------

    async def on_session(self, msg: Msg) -> None:
        """A message for a session held here: delivered once (retries dropped), acknowledged to its sender."""
        link = self.link
        url = link.sub_urls.get(msg.subject)
        reply = msg.reply
        if reply:
            if reply in self._seen:
                self.counters["duplicates"] += 1
                self._ack(reply)  # its first acknowledgement was lost
                return
        if url is not None and url in link.claiming:
            link.claiming[url].append(msg.data)
        else:
            actions = None if url is None else link.core.remote_deliver(url, msg.data)
            if actions is None:
                if reply:
                    await msg.respond(b"gone")
                return
            link.apply(actions)
        if reply:
            seen = self._seen
            seen[reply] = None
            if len(seen) > _SEEN_MAX:
                del seen[next(iter(seen))]
            self._ack(reply)

    def _ack(self, reply: str) -> None:
        inbox, _, seq = reply.rpartition(".")
        acks = self._acks
        if not acks:  # a little later: more in one batch, and never ahead of the traffic it acknowledges
            asyncio.get_running_loop().call_later(_ACK_DELAY, self._send_acks)
        acks.setdefault(inbox, []).append(seq)

    def _send_acks(self) -> None:
        """One acknowledgement per sending node for what arrived in the last ``_ACK_DELAY``."""
        acks, self._acks = self._acks, {}
        for inbox, seqs in acks.items():
            self.queue(f"{inbox}.ack", ",".join(seqs).encode(), "")

    # -- buffers ------------------------------------------------------------------------------------------

    async def to_buffer(self, url: str, data: bytes, ident: str | None = None) -> None:
        """Keep ``data`` in session ``url``'s buffer stream; an unknown session is ``404`` to the sender.

        ``ident`` names the forward it was (``<inbox>.<seq>``): the node that holds the session drops it if it
        already took that forward over the session subject (a retry bounced after the first copy arrived).
        """
        link = self.link
        sid = session_id(url)
        record = link.records.get(sid)
        if record is None:
            with contextlib.suppress(KeyNotFoundError):
                entry = await link.kv[link.names.sessions].get(sid)
                if entry.value:
                    record = _decode_record(entry.value)
        if record is None:
            link.apply(link.core.undeliverable(data, 404, f"no route: the session {url} no longer exists"))
            return
        if sid in link.session_subs:  # it came back here meanwhile
            if ident is not None and ident in self._seen:
                self.counters["duplicates"] += 1
                return
            actions = link.core.remote_deliver(url, data)
            if actions is not None:
                link.apply(actions)
                return
        assert link.js is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _BUFFER_RETRY_SECONDS
        while True:
            try:
                headers = None if ident is None else {BUFFER_ID: ident}
                await link.js.publish(link.names.buffer(sid), data, timeout=link.timeout, headers=headers)
                break
            except Exception as exc:  # a JetStream leader lost with its server: retried while it is re-elected
                if loop.time() < deadline:
                    await asyncio.sleep(0.25)  # nothing announces the new leader to a client
                    continue
                self.counters["buffer_failed"] += 1
                text = f"the session {url} is between nodes and its buffer is unavailable ({exc or type(exc).__name__})"
                link.apply(link.core.undeliverable(data, 503, text))
                return
        self.counters["to_buffer"] += 1
        if sid not in link.records and not await self._exists(sid):  # it ended while this was on its way
            await drop_buffer(link, sid)
            return
        owner = link.records[sid].owner if sid in link.records else record.owner
        if owner == link.node_id:
            link.tasks.spawn(self.deliver_buffer(url), name="deliver buffer")
        elif owner:  # its node may only be away from NATS for a moment (reconnecting): it is told
            link.tasks.spawn(self._nudge(owner, url), name="buffer nudge")

    async def _exists(self, sid: str) -> bool:
        link = self.link
        try:
            entry = await link.kv[link.names.sessions].get(sid)
        except KeyNotFoundError:
            return False
        except Exception:  # NATS trouble: assume it does (its owner or a claim reads the buffer)
            return True
        return bool(entry.value)

    async def _nudge(self, owner: str, url: str) -> None:
        """Tell ``owner`` to deliver what waits in ``url``'s buffer (retried while it is reconnecting)."""
        link = self.link
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3 * _BUFFER_RETRY_SECONDS
        while loop.time() < deadline:
            nc = link.nc
            if nc is None:
                return
            try:
                await nc.request(link.names.control(owner), _encode({"deliver": url}), timeout=2.0)
                return
            except Exception:  # not back yet, or not read yet (or dead: a claim of its session replays the buffer)
                await asyncio.sleep(0.2)

    async def deliver_buffer(self, url: str) -> bool:
        """Deliver what waits in the buffer stream of session ``url`` (held here) to it, in order.

        One reader per session at a time (a lock): every caller's read starts after what prompted it.
        False when the stream stayed unreadable (the caller's prompt is not answered: it asks again).
        """
        link = self.link
        lock = self._delivering.get(url)
        if lock is None:
            lock = self._delivering[url] = asyncio.Lock()
        loop = asyncio.get_running_loop()
        try:
            async with lock:
                if session_id(url) not in link.session_subs:
                    return True  # not ours (any more): whoever holds it reads it
                deadline = loop.time() + _BUFFER_RETRY_SECONDS
                while True:
                    try:
                        frames = await take_buffer(link, session_id(url), self._seen)
                        break
                    except Exception as exc:  # the stream's leader lost with its server: read again shortly
                        if loop.time() > deadline:
                            link.log.error("buffer not read", error=str(exc) or type(exc).__name__)
                            return False
                        await asyncio.sleep(0.25)  # nothing announces the new leader to a client
                for frame in frames:
                    actions = link.core.remote_deliver(url, frame)
                    if actions is None:  # it moved meanwhile: follow it
                        self.send_to_session(url, frame)
                    else:
                        link.apply(actions)
                return True
        finally:
            if not lock.locked() and self._delivering.get(url) is lock:
                del self._delivering[url]

    # -- after a node died ---------------------------------------------------------------------------------

    async def on_resend(self, msg: Msg) -> None:
        """A session's node died and another claimed it: send again what went to it lately (at least once)."""
        link = self.link
        try:
            notice = msgspec.json.decode(msg.data)
            url, dead = notice["url"], notice["dead"]
        except (msgspec.DecodeError, KeyError, TypeError):
            return
        seen = link.nodes_seen.get(dead)
        now = time.monotonic()
        # from a heartbeat interval before the dead node's last sign of life (all of the window if unknown)
        since = now - _SENT_SECONDS if seen is None else max(now - _SENT_SECONDS, seen - 2 * link.heartbeat)
        again = [data for when, url_, data in list(self._sent.values()) if url_ == url and when >= since]
        self.counters["resent"] += len(again)
        for data in again:
            self.send_to_session(url, data)
