"""The runtime's small persistent state: a key/value table in SQLite in the state directory.

It holds what must survive a restart of the runtime for the runtime to stay the same runtime to the
outside: its URL per domain, and the counters from which component numbers are reserved so that none is
ever handed out twice.  Every call blocks on disk, so callers run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["STATE_FILE", "StateStore"]

STATE_FILE = "runtime.sqlite"


class StateStore:
    """The runtime's small persistent state: a key/value table in SQLite, touched off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=5.0)
        connection.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return connection

    def get(self, key: str) -> str | None:
        with self._connect() as connection:
            row = connection.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_default(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` already has one; return what is stored (race-free)."""
        with self._connect() as connection:
            connection.execute("INSERT OR IGNORE INTO state (key, value) VALUES (?, ?)", (key, value))
            row = connection.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return str(row[0])

    def reserve(self, key: str, block: int) -> int:
        """Advance the counter ``key`` by ``block`` and return the first number of the reserved block."""
        with self._connect() as connection:
            connection.execute("INSERT OR IGNORE INTO state (key, value) VALUES (?, '1')", (key,))
            start = int(connection.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()[0])
            connection.execute("UPDATE state SET value = ? WHERE key = ?", (str(start + block), key))
        return start
