"""Passing connected sockets from the runtime to a sandbox host (``SCM_RIGHTS``), both ends.

The message channel is a byte stream owned by an asyncio transport, so sockets travel on a second,
dedicated ``SOCK_SEQPACKET`` socketpair: each packet carries one descriptor and, as its payload, the id
of the ``open-connection`` request it answers.  The runtime sends the packet *before* it writes the
``200`` answer on the message channel, so when the host reads that answer the packet is already queued
on its end and :meth:`SocketInbox.claim` finds it with non-blocking reads: the event loop never waits on
this socketpair, and nothing needs a reader callback.

A Node.js host cannot receive a descriptor on such a socket; it can on its IPC channel, so its pair is a
``SOCK_STREAM`` one whose host end Node opens as ``NODE_CHANNEL_FD``, and each socket travels as Node's
own handle message (:func:`send_node_handle`, the framing of Node's ``lib/internal/child_process.js``:
one JSON line per message, the descriptor attached to the line that says ``NODE_HANDLE``).  Node
acknowledges each handle with a line of its own, which the runtime reads and discards
(:func:`drain_acks`).  Ordering is not guaranteed across the two channels there, so the Node host waits
for both the socket and the answer (``node_egress.js``).

Kept to the standard library: the sandbox host imports it in every stub process.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Collection

__all__ = [
    "MAX_UNCLAIMED",
    "SocketInbox",
    "drain_acks",
    "node_socket_pair",
    "send_node_handle",
    "send_socket",
    "socket_pair",
]

#: Descriptors received and not yet claimed beyond which the oldest are closed (a bound, not a queue).
MAX_UNCLAIMED = 64
_TAG_MAX = 64
#: Reads of a Node host's IPC channel per readiness callback.
_DRAIN_READS = 16


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """The (runtime end, host end) pair; the runtime's end is non-blocking."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setblocking(False)
    return parent, child


def send_socket(channel: socket.socket, tag: str, sock: socket.socket) -> None:
    """Send ``sock``'s descriptor tagged with ``tag``; ``OSError`` (e.g. ``BlockingIOError``) if it cannot."""
    data = tag.encode("utf-8")
    if not data or len(data) > _TAG_MAX:
        raise ValueError(f"tag must be 1-{_TAG_MAX} bytes, got {len(data)}")
    socket.send_fds(channel, [data], [sock.fileno()])


def node_socket_pair() -> tuple[socket.socket, socket.socket]:
    """The (runtime end, host end) pair of a Node host: a stream socket, as Node's IPC channel must be."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    return parent, child


def send_node_handle(channel: socket.socket, tag: str, sock: socket.socket) -> None:
    """Send ``sock`` to a Node host as a ``net.Socket`` handle tagged ``tag``; ``OSError`` if it cannot.

    The line is small and Node reads its channel eagerly, so it is written whole or not at all; a partial
    write (a full buffer) would desynchronise Node's line framing, so it is reported as an error and the
    caller gives up on this channel.
    """
    if not tag or len(tag) > _TAG_MAX:
        raise ValueError(f"tag must be 1-{_TAG_MAX} characters, got {len(tag)}")
    message = {"cmd": "NODE_HANDLE", "type": "net.Socket", "msg": {"protofly": "egress", "id": tag}}
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    sent = socket.send_fds(channel, [data], [sock.fileno()])
    if sent != len(data):
        raise BrokenPipeError(f"wrote {sent} of {len(data)} bytes of a handle message to the Node host")


def drain_acks(channel: socket.socket) -> tuple[bool, int]:
    """Read what a Node host wrote on its IPC channel (its handle ACKs): (still open, NACKs seen).

    At most ``_DRAIN_READS`` reads a call, so a stub writing there without pause (it can reach Node's
    ``process``) costs the runtime one bounded read per loop turn; descriptors it might attach are
    dropped by the kernel, since no ancillary buffer is given.
    """
    nacks = 0
    for _ in range(_DRAIN_READS):
        try:
            data = channel.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True, nacks
        except OSError:
            return False, nacks
        if not data:
            return False, nacks
        nacks += data.count(b"NODE_HANDLE_NACK")
    return True, nacks


class SocketInbox:
    """The host's end: received descriptors by tag, claimed once each as a non-blocking socket."""

    def __init__(self, channel: socket.socket) -> None:
        channel.setblocking(False)
        self.channel = channel
        self._fds: dict[str, int] = {}

    def claim(self, tag: str, pending: Collection[str] = ()) -> socket.socket | None:
        """The socket sent with ``tag``, or None if none came.

        Sockets for tags neither ``tag`` nor in ``pending`` (requests the stub gave up waiting for) are
        closed here, so an abandoned connection does not stay open in the stub's process.
        """
        self._drain()
        for stale in [t for t in self._fds if t != tag and t not in pending]:
            os.close(self._fds.pop(stale))
        fd = self._fds.pop(tag, None)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock

    def _drain(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, _TAG_MAX, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data and not fds:
                return  # the runtime closed its end
            tag = data.decode("utf-8", "replace")
            for extra in fds[1:]:
                os.close(extra)
            if not fds:
                continue
            old = self._fds.pop(tag, None)
            if old is not None:
                os.close(old)
            self._fds[tag] = fds[0]
            while len(self._fds) > MAX_UNCLAIMED:
                os.close(self._fds.pop(next(iter(self._fds))))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.channel.close()
