"""The state file: the node's snapshot on disk between a graceful stop and the next start.

Blocking file I/O, meant to run in a thread (``asyncio.to_thread``).  Writing is atomic (temp file in the
same directory, fsync, rename, fsync of the directory), so a crash mid-write leaves the previous file or
none, never half a file; a loaded file is moved aside (``<name>.loaded``) so that a crash after the start
never replays a stale state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from protofly.msgnode.snapshot import StateError

__all__ = ["move_aside", "read_state", "write_state"]


def read_state(path: Path) -> Any:
    """The decoded JSON of the state file; None if it does not exist (its directory must)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise StateError(f"state file {path}: its directory does not exist") from None
        return None
    except OSError as exc:
        raise StateError(f"state file {path}: cannot read it ({exc})") from None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise StateError(f"state file {path}: not valid JSON ({exc}); move it away to start an empty node") from None


def write_state(path: Path, snapshot: dict[str, Any]) -> int:
    """Write atomically: a temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    data = msgspec.json.encode(snapshot)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return len(data)


def move_aside(path: Path) -> None:
    """Rename a loaded state file to ``<name>.loaded`` (raises ``OSError``)."""
    os.replace(path, path.with_name(path.name + ".loaded"))
