"""The node's durable state: a checkpoint file and an append-only journal in one directory.

With ``state_dir`` the node survives SIGKILL: every change the core reports (:attr:`MessageNodeCore.journal`)
is on disk *before* the shell acts on it, so an ``ack`` (or a reply) never leaves the node for something a
restarted node would not know.

* ``state.json`` -- a checkpoint: the full snapshot (``snapshot.py``: sessions, allocations, bindings,
  subscriptions, buffers, numbered messages not acknowledged).  Rewritten atomically (temp file, rename)
  whenever the structure changes (a session opened or ended, an allocation, a subscription, a binding) and
  when the journal grows past ``checkpoint_bytes``; the journal is emptied after each checkpoint.
* ``journal`` -- the message traffic between checkpoints, one record per change: numbered messages kept
  for a session (``q``: ``["q",session,seq,m1,m2,...]``, consecutive numbers from ``seq``, the messages'
  JSON spliced in), acknowledged by its runtime (``a``), the last number received from a runtime
  (``r``).  Records are length-prefixed (``<length>\\n<json>\\n``); a torn last record (killed mid-write)
  is ignored on load.  Replaying is idempotent, so a crash between a checkpoint and the journal's
  truncation only replays records the checkpoint already holds.

fsync policy (``fsync_interval``): records are written with ``write(2)`` before the node acts on them,
which is all a process crash (SIGKILL, OOM kill) needs -- the kernel keeps the page cache.  The shell
commits a loop turn's records in one ``write(2)`` (group commit), before the first byte of that turn is
written to any socket.  Against a
machine crash (power loss) the files are ``fsync``-ed every ``fsync_interval`` seconds in a thread (the
default, 1 s: at most that much acknowledged traffic is at risk); ``0`` fsyncs every batch on the loop
(each costs a disk flush, see docs/benchmarks.md); ``None`` never fsyncs.  Blocking I/O on the loop is
limited to these small appends and the checkpoint rename.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from protofly.msgnode.snapshot import StateError

__all__ = ["Journal", "read_records"]

_record = msgspec.json.Decoder(list[Any])
_encode = msgspec.json.Encoder().encode


def read_records(data: bytes) -> list[list[Any]]:
    """The records of a journal's bytes; a torn or damaged tail ends the list (what came before is kept)."""
    records: list[list[Any]] = []
    offset = 0
    size = len(data)
    while offset < size:
        newline = data.find(b"\n", offset, offset + 24)
        if newline < 0:
            break
        try:
            length = int(data[offset:newline])
        except ValueError:
            break
        start = newline + 1
        end = start + length
        if end + 1 > size or data[end : end + 1] != b"\n":
            break
        try:
            records.append(_record.decode(data[start:end]))
        except msgspec.DecodeError:
            break
        offset = end + 1
    return records


class Journal:
    """The files of one node's durable state; blocking, small calls (see the module docstring)."""

    def __init__(self, directory: Path, *, checkpoint_bytes: int = 64 << 20) -> None:
        self.directory = directory
        self.state_path = directory / "state.json"
        self.journal_path = directory / "journal"
        self.checkpoint_bytes = checkpoint_bytes
        self.size = 0
        self.records = 0
        #: ``write(2)`` calls of records (group commit: one per loop turn that changed something).
        self.writes = 0
        self.checkpoints = 0
        self._fd: int | None = None
        self._names: dict[str, bytes] = {}  # session URL -> its JSON string, for the hot path

    def load(self) -> tuple[Any, list[list[Any]]]:
        """The checkpoint (decoded JSON, or None) and the journal's records after it."""
        if not self.directory.is_dir():
            raise StateError(f"state directory {self.directory}: it does not exist")
        try:
            snapshot = msgspec.json.decode(self.state_path.read_bytes())
        except FileNotFoundError:
            snapshot = None
        except (OSError, msgspec.DecodeError) as exc:
            raise StateError(f"state directory {self.directory}: state.json cannot be read ({exc})") from None
        try:
            records = read_records(self.journal_path.read_bytes())
        except FileNotFoundError:
            records = []
        except OSError as exc:
            raise StateError(f"state directory {self.directory}: journal cannot be read ({exc})") from None
        return snapshot, records

    def open(self) -> None:
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self._fd).st_size

    def append(self, records: list[Any]) -> bool:
        """Write ``records`` (one ``write(2)``) before the node acts on them; False, writing nothing, when
        one of them is a structural change (``("x",)``: the caller writes a checkpoint instead).

        Consecutive numbered messages of one session become one record, ``["q",session,seq,m1,m2,...]``,
        the messages' JSON spliced in as they are (no re-encoding, no base64).
        """
        fd = self._fd
        if fd is None or not records:
            return True
        parts: list[bytes] = []
        group: list[bytes] = []
        group_url = ""
        group_seq = next_seq = 0
        for record in records:
            kind = record[0]
            if kind == "q":
                _, url, seq, data = record
                if seq == next_seq and url == group_url:
                    group.append(data)
                    next_seq += 1
                    continue
                if group:
                    parts.append(self._numbered(group_url, group_seq, group))
                group = [data]
                group_url = url
                group_seq = seq
                next_seq = seq + 1
                continue
            if kind == "x":
                return False
            if group:
                parts.append(self._numbered(group_url, group_seq, group))
                group = []
                next_seq = 0
            payload = _encode(record)
            parts.append(b"%d\n%s\n" % (len(payload), payload))
        if group:
            parts.append(self._numbered(group_url, group_seq, group))
        data = b"".join(parts)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self.size += len(data)
        self.records += len(parts)
        self.writes += 1
        return True

    def _numbered(self, url: str, seq: int, messages: list[bytes]) -> bytes:
        """One ``q`` record (length-prefixed) for consecutive numbered messages of one session."""
        names = self._names
        name = names.get(url)
        if name is None:
            name = _encode(url)
            if len(names) < 10_000:
                names[url] = name
        payload = b'["q",%s,%d,%s]' % (name, seq, b",".join(messages))
        return b"%d\n%s\n" % (len(payload), payload)

    @property
    def due(self) -> bool:
        """The journal is large enough to be folded into a checkpoint."""
        return self.size >= self.checkpoint_bytes

    def checkpoint(self, snapshot: dict[str, Any], *, sync: bool = False) -> int:
        """Replace ``state.json`` atomically with ``snapshot`` and empty the journal; returns its size."""
        data = msgspec.json.encode(snapshot)
        temp = self.directory / ".state.json.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.state_path)
        if sync:
            self._sync_directory()
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self.size = 0
        self.checkpoints += 1
        return len(data)

    def sync(self) -> None:
        """fsync the journal and the directory (in a thread: it waits for the disk)."""
        fd = self._fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        self._sync_directory()

    def _sync_directory(self) -> None:
        with contextlib.suppress(OSError):
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
