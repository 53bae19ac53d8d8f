"""A process host's network: the socket-passing pair, and the stub's ``open-connection`` requests over it.

The stub has no network of its own (its namespace has only loopback): the runtime opens what its
descriptor's ``egress`` allows (:mod:`~protofly.sandbox.broker`) and passes the connected socket on a second
socketpair (:mod:`~protofly.sandbox.fdpass`), to a Python host as ``SCM_RIGHTS`` and to a Node host on
Node's IPC channel, whose per-handle ACKs are read and dropped here.  The requests themselves arrive on the
message channel and are served by :class:`~protofly.sandbox.egress_channel.EgressChannel`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from structlog.stdlib import BoundLogger

from protofly.message import Message
from protofly.sandbox.broker import EgressBroker
from protofly.sandbox.egress_channel import Answer, EgressChannel
from protofly.sandbox.fdpass import drain_acks, node_socket_pair, send_node_handle, send_socket, socket_pair
from protofly.tasks import TaskSet

__all__ = ["HostNetwork"]


class HostNetwork:
    """One host's socket-passing pair (``node``: Node's IPC flavour) and, once a stub is deployed, its egress."""

    def __init__(self, *, node: bool, log: Callable[[], BoundLogger]) -> None:
        self._node = node
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._net: socket.socket | None = None
        self._egress: EgressChannel | None = None
        self.broker: EgressBroker | None = None

    def open(self) -> socket.socket:
        """Make the pair; returns the host's end (the caller passes it to the host and closes its copy)."""
        self._net, child = node_socket_pair() if self._node else socket_pair()
        if self._node:  # Node acknowledges each socket it gets on its IPC channel: read and dropped
            self._loop.add_reader(self._net.fileno(), self._drain_node_acks)
        return child

    def serve(self, broker: EgressBroker, tasks: TaskSet, answer: Answer, alive: Callable[[], bool]) -> None:
        """A stub was deployed: its ``open-connection`` requests are served from now on, under ``broker``."""
        self.broker = broker
        if self._net is not None:
            send = send_node_handle if self._node else send_socket
            self._egress = EgressChannel(broker, self._net, tasks, answer, alive, send=send)

    def declared(self) -> list[str]:
        """The endpoints the deployed stub may reach (its descriptor's ``egress``)."""
        return self.broker.policy.declared() if self.broker is not None else []

    def handle(self, msg: Message, answer: Answer, deployed: bool) -> None:
        """An ``execute`` from the host: ``open-connection`` (the stub's network) is the only one."""
        if self._egress is None or not deployed:
            answer(msg, 409, "egress: no stub is deployed in this sandbox")
            return
        self._egress.handle(msg)

    def close(self) -> None:
        net, self._net = self._net, None
        if net is not None:
            if self._node:
                self._loop.remove_reader(net.fileno())
            net.close()

    def _drain_node_acks(self) -> None:
        """Read (and drop) a Node host's handle ACKs; a NACK, a socket Node could not take, is logged."""
        net = self._net
        if net is None:
            return
        still_open, nacks = drain_acks(net)
        if nacks:
            self._log().warning("the Node host could not take a socket passed to it", nacks=nacks)
        if not still_open:
            self._loop.remove_reader(net.fileno())
