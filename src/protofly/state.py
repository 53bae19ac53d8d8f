"""The runtime's state directory: who may own it, and its small persistent key/value table (SQLite).

The table holds what must survive a restart of the runtime for the runtime to stay the same runtime to
the outside: its URL per domain, and the counters from which component numbers are reserved so that none
is ever handed out twice.  Every call blocks on disk, so callers run it in a thread (``asyncio.to_thread``).

The directory also holds the admin socket, which can load code and send messages in the runtime's name,
and the catalogue cache the runtime trusts.  So a runtime refuses a state directory (and the admin server
a socket directory) that another user owns or that others may write to (:func:`check_private_dir`), and
the admin client refuses to talk to a socket another user could have put there (:func:`check_socket`).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

__all__ = ["STATE_FILE", "StateDirError", "StateStore", "check_private_dir", "check_socket"]


class StateDirError(Exception):
    """A state or socket directory (or a socket) the runtime must not trust; the text says why and what to do."""


def check_private_dir(path: Path, *, create: bool = True, what: str = "state directory") -> None:
    """Make sure ``path`` is a directory of this process's user that nobody else may write to.

    A missing directory is created mode 0700 when ``create``.  Refused (:class:`StateDirError`): a
    directory owned by another uid (that user could replace the admin socket, the state file or a cached
    stub), one that group or others may write to (mode ``& 0o022``, so also a sticky ``/tmp``-like one:
    another user could have put a socket there first), something that is not a directory, and one this
    user cannot even look at.  Blocking: call it in a thread.
    """
    if create:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except PermissionError as exc:
            raise StateDirError(f"permission denied on {path}: {exc.strerror} (cannot create the {what})") from None
    try:
        info = path.stat()
    except PermissionError as exc:
        raise StateDirError(f"permission denied on {path}: {exc.strerror}") from None
    except FileNotFoundError:
        raise StateDirError(f"{what} {path} does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"{what} {path} is not a directory")
    uid = os.geteuid()
    if info.st_uid != uid:
        raise StateDirError(
            f"{what} {path} is owned by uid {info.st_uid}, not by this process's user (uid {uid}); "
            "refusing to use it: give a directory of your own"
        )
    if info.st_mode & 0o022:
        raise StateDirError(
            f"{what} {path} is writable by others (mode {info.st_mode & 0o7777:o}); "
            f"refusing to use it: chmod go-w {path}"
        )


def check_socket(path: Path) -> None:
    """Before a client talks to the unix socket ``path``: it and its directory must be this user's.

    A socket another user owns (or could have swapped in, because its directory is theirs or writable by
    others) may be a fake runtime, so the client does not connect; the message starts with
    ``permission denied on <path>`` as an operating-system refusal would.  A missing socket passes: the
    connection attempt then says that no runtime is listening.  Blocking: call it in a thread.
    """
    uid = os.geteuid()
    folder = path.parent
    try:
        folder_info = folder.stat()
        info = path.lstat()
    except FileNotFoundError:
        return
    except PermissionError as exc:
        raise StateDirError(
            f"permission denied on {path}: {exc.strerror} (the runtime's socket is reachable only by the user "
            "running it: run the command as that user)"
        ) from None
    if folder_info.st_uid != uid or folder_info.st_mode & 0o022:
        raise StateDirError(
            f"permission denied on {path}: its directory {folder} belongs to uid {folder_info.st_uid} "
            f"(mode {folder_info.st_mode & 0o7777:o}), so another user could have put this socket there; "
            f"refusing to talk to it as uid {uid}"
        )
    if info.st_uid != uid:
        raise StateDirError(
            f"permission denied on {path}: the socket belongs to uid {info.st_uid}, not to you (uid {uid}); "
            "refusing to talk to a runtime another user may have put there"
        )


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
