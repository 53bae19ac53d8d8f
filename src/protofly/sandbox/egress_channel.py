"""The runtime's end of a process sandbox's ``open-connection`` requests (see :mod:`protofly.sandbox.broker`).

The host sends ``execute {method: "open-connection", params: [url]}`` on the message channel; this asks
the broker for the connection in a task of its own (the channel keeps flowing meanwhile), passes the
connected socket on the socket-passing pair (:mod:`protofly.sandbox.fdpass`) and only then answers
``200``, so that the host finds the socket queued when it reads the answer.  A refusal is answered with
the broker's code and description; at most ``MAX_OPENING`` connects run per stub at once, and more are
refused (``429``) and counted like any other refusal.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from protofly.message import Message
from protofly.sandbox.broker import EgressBroker, EgressRefused
from protofly.sandbox.fdpass import send_socket
from protofly.tasks import TaskSet

__all__ = ["MAX_OPENING", "EgressChannel"]

#: Connections being opened for one stub at once.
MAX_OPENING = 16

Answer = Callable[[Message, int, str | None], None]


class EgressChannel:
    """Serves one stub's ``open-connection`` requests; ``answer(request, code, description)`` replies."""

    def __init__(
        self,
        broker: EgressBroker,
        net: socket.socket,
        tasks: TaskSet,
        answer: Answer,
        alive: Callable[[], bool],
        *,
        send: Callable[[socket.socket, str, socket.socket], None] = send_socket,
    ) -> None:
        self.broker = broker
        self._net = net
        self._tasks = tasks
        self._answer = answer
        self._alive = alive
        self._opening = 0
        self._send = send  # how a socket travels to this host (fdpass: a Python host's, or Node's IPC)

    def handle(self, msg: Message) -> None:
        """One ``execute`` request from the host."""
        body = msg.body or {}
        if body.get("method") != "open-connection":
            self._answer(msg, 404, f"unknown sandbox method {body.get('method')!r}")
            return
        if not isinstance(msg.id, int) or isinstance(msg.id, bool):
            self._refuse(msg, EgressRefused(400, "egress: open-connection needs an integer id"))
            return
        params = body.get("params")
        if not isinstance(params, list) or len(params) != 1:
            self._refuse(msg, EgressRefused(400, "egress: open-connection needs params [url]"))
            return
        if self._opening >= MAX_OPENING:
            self._refuse(
                msg, EgressRefused(429, f"egress: {MAX_OPENING} connections are being opened for this stub already")
            )
            return
        self._opening += 1
        self._tasks.spawn(self._open(msg, params[0]), name="egress connect")

    def _refuse(self, msg: Message, refusal: EgressRefused) -> None:
        self.broker.refused(refusal)
        self._answer(msg, refusal.code, refusal.description)

    async def _open(self, msg: Message, url: Any) -> None:
        try:
            sock = await self.broker.open(url)
        except EgressRefused as exc:
            self._answer(msg, exc.code, exc.description)
            return
        finally:
            self._opening -= 1
        try:
            if not self._alive() or self._net.fileno() < 0:
                return
            try:
                self._send(self._net, str(msg.id), sock)
            except OSError as exc:
                self._answer(msg, 503, f"egress: cannot pass the socket to the stub ({exc.strerror or exc})")
                return
            self._answer(msg, 200, None)
        finally:
            sock.close()  # the stub holds its own copy now
