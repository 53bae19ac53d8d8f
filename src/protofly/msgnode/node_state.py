"""The core's state as data: the snapshot, its restore, and the journal of changes between snapshots.

A mixin of :class:`~protofly.msgnode.core.MessageNodeCore`.  The shell does the file I/O (``statefile.py``
for the graceful-stop file, ``journal.py`` for the durable state of ``--state-dir``); here the core exports
and loads plain JSON-able data (``snapshot.py``) and replays the journal's records onto a restored state.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protofly.msgnode import snapshot as state_snapshot
from protofly.msgnode.addresses import AddressTable
from protofly.msgnode.session import SessionTable
from protofly.msgnode.session_manager import SessionManager
from protofly.msgnode.snapshot import StateError
from protofly.msgnode.subscriptions import SubscriptionTable

__all__ = ["NodeState"]

encode_any = msgspec.json.encode


class NodeState:
    """Snapshot, restore and journal replay of the core's tables."""

    domain: str
    counters: dict[str, int]
    sessions: SessionTable
    addresses: AddressTable
    subscriptions: SubscriptionTable
    manager: SessionManager
    #: See :class:`~protofly.msgnode.core.MessageNodeCore`: the changes the shell has not taken yet.
    journal: list[Any] | None

    def take_journal(self) -> list[Any]:
        """What changed since the last call (see :attr:`journal`); empty without ``journal``."""
        journal = self.journal
        if not journal:
            return []
        taken = journal.copy()
        journal.clear()
        return taken

    def snapshot(self) -> dict[str, Any]:
        """Everything a restarted node needs, as plain JSON-able data that shares nothing with the core.

        Sessions are exported whether connected or not: a restored node holds them all detached.
        """
        return state_snapshot.export(self.domain, self.sessions)

    def restore(self, snapshot: Any, now: float) -> int:
        """Load a :meth:`snapshot` into this (empty) core; every session detached until ``now + session_grace``.

        Raises :class:`StateError` naming the field at fault; nothing is loaded then.  Returns the number of
        sessions loaded.
        """
        if len(self.sessions) or self.manager.conns:
            raise StateError("restore: this message node already has sessions or connections")
        sessions, owner = state_snapshot.load(snapshot, self.domain)
        # all checked: install
        self.sessions.install(sessions)
        self.addresses.install(owner)
        self.subscriptions.install(sessions)
        deadline = now + max(self.manager.session_grace, 0.0)  # a zero grace expires them at the first tick
        for session in sessions:
            self.sessions.schedule(session, deadline)
        self.counters["sessions_restored"] += len(sessions)
        return len(sessions)

    def apply_journal(self, records: list[list[Any]]) -> int:
        """Replay journal records (``journal.py``) onto the state just restored; returns how many applied.

        Idempotent: a record the restored checkpoint already reflects changes nothing.  Records of
        sessions the checkpoint does not hold (ended since) are skipped.
        """
        applied = 0
        for record in records:
            kind = record[0] if record else None
            session = self.sessions.get(record[1]) if kind in ("q", "a", "r") and len(record) > 2 else None
            if session is None or not isinstance(record[2], int):
                continue
            seq = record[2]
            if kind == "q":  # ["q", session, seq, m_seq, m_seq+1, ...]
                for number, message in enumerate(record[3:], seq):
                    if number > session.sent:
                        if number > session.sent + 1:  # a gap (a damaged journal): numbers must stay consecutive
                            session.unacked.clear()
                            session.unacked_bytes = 0
                        session.sent = number - 1
                        if session.number(encode_any(message), 1 << 62, 1 << 62):
                            applied += 1
            elif kind == "a" and session.acknowledged(seq):
                applied += 1
            elif kind == "r" and seq > session.received:
                session.received = seq
                applied += 1
        return applied
