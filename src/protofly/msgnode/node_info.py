"""Read-only views of a node core: its configuration and what it holds (tests, ``/stats``, metrics).

A mixin of :class:`~protofly.msgnode.core.MessageNodeCore`: every value here is read from the tables and
the session manager, nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Hashable

from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.session import Session, SessionTable
from protofly.msgnode.session_manager import SessionManager
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = ["NodeInfo"]


class NodeInfo:
    """Configuration and introspection of the core (tests, stats)."""

    sessions: SessionTable
    addresses: AddressTable
    subscriptions: SubscriptionTable
    manager: SessionManager

    @property
    def session_grace(self) -> float:
        return self.manager.session_grace

    @property
    def max_frame(self) -> int:
        return self.manager.max_frame

    @property
    def buffer_messages(self) -> int:
        return self.manager.buffer_messages

    @property
    def buffer_bytes(self) -> int:
        return self.manager.buffer_bytes

    @property
    def max_addresses(self) -> int:
        return self.addresses.max_addresses

    @property
    def max_block(self) -> int:
        return self.addresses.max_block

    @property
    def max_bound(self) -> int:
        return self.addresses.max_bound

    @property
    def max_subscriptions(self) -> int:
        return self.subscriptions.max_subscriptions

    @property
    def auth_required(self) -> bool:
        return self.manager.auth_required

    def session(self, url: str) -> Session | None:
        """The live or detached session at ``<runtimeURL>/<token>``."""
        return self.sessions.get(url)

    def session_of(self, conn: Hashable) -> Session | None:
        state = self.manager.conns.get(conn)
        return None if state is None else state.session

    def owner(self, address: str) -> Session | None:
        """The session an allocated or bound address routes to."""
        return self.addresses.owner(address)

    def subscribers(self, resource: str) -> list[Session]:
        return list(self.subscriptions.subscribers(resource) or ())

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    @property
    def address_count(self) -> int:
        return len(self.addresses)

    @property
    def draining(self) -> bool:
        return self.manager.draining

    @property
    def drain_pending(self) -> int:
        """Drain connections that have neither said ``drained`` nor gone away yet."""
        return len(self.manager.awaiting)

    def plain_connections(self) -> int:
        """Open connections that did not negotiate the drain extension (closed after the short grace)."""
        return sum(1 for state in self.manager.conns.values() if not state.drain and not state.closing)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work to do (a detached session expiring), or None."""
        return self.sessions.next_deadline()
