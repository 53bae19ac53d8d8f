"""The stub cache: SQLite in the runtime's state directory, sources addressed by their sha256.

Synchronous on purpose: :class:`CatalogueClient` calls it through :func:`asyncio.to_thread` and keeps
an in-memory mirror, so the event loop never waits on the disk.  A stub is keyed by ``(domain, name)``
→ the latest verified ``(version, sha256, etag, descriptor)``; the source bytes live once per sha256 in
``blobs``.  What is stored has been verified; what is read is checked against its sha256 again, so a
damaged file is a cache miss, never a stub with unexpected code.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from protofly.catalogue.model import sha256_hex
from protofly.log import get_logger

__all__ = ["CACHE_FILE", "CacheEntry", "StubCache"]

CACHE_FILE = "catalogue.sqlite3"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS stubs (
    domain            TEXT NOT NULL,
    name              TEXT NOT NULL,
    url               TEXT NOT NULL,
    etag              TEXT,
    fresh_until       REAL NOT NULL,
    version           TEXT NOT NULL,
    sha256            TEXT NOT NULL,
    descriptor_digest TEXT NOT NULL,
    signer            TEXT,
    signer_domain     TEXT NOT NULL,
    descriptor        BLOB NOT NULL,
    fetched_at        REAL NOT NULL,
    PRIMARY KEY (domain, name)
);
"""
_COLUMNS = (
    "domain, name, url, etag, fresh_until, version, sha256, descriptor_digest, signer, signer_domain, "
    "descriptor, fetched_at"
)

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One verified stub as cached.  ``descriptor`` is the descriptor JSON without the embedded source."""

    domain: str
    name: str
    url: str
    etag: str | None
    fresh_until: float
    version: str
    sha256: str
    descriptor_digest: str
    signer: str | None
    signer_domain: str
    descriptor: bytes
    fetched_at: float
    source: bytes


class StubCache:
    """SQLite-backed; thread-safe (one connection behind a lock); ``path=None`` keeps it in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = self._open(path)

    def _open(self, path: Path | None) -> sqlite3.Connection:
        if path is None:
            return self._init(sqlite3.connect(":memory:", check_same_thread=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._init(sqlite3.connect(path, check_same_thread=False, timeout=5.0))
        except sqlite3.DatabaseError as exc:
            # A damaged cache must not stop the runtime: keep the file for inspection, start afresh.
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.rename(aside)
            _log.warning("catalogue cache unreadable; moved aside", path=str(path), moved_to=str(aside), error=str(exc))
            return self._init(sqlite3.connect(path, check_same_thread=False, timeout=5.0))

    @staticmethod
    def _init(db: sqlite3.Connection) -> sqlite3.Connection:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"cache schema version {version}, expected {_SCHEMA_VERSION}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.commit()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get(self, domain: str, name: str) -> CacheEntry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS}, blobs.data FROM stubs JOIN blobs USING (sha256) WHERE domain=? AND name=?",
                (domain, name),
            ).fetchone()
        if row is None:
            return None
        domain, name, url, etag, fresh_until, version, sha256, digest, signer, signer_domain, descriptor, at, data = row
        entry = CacheEntry(
            domain=domain,
            name=name,
            url=url,
            etag=etag,
            fresh_until=fresh_until,
            version=version,
            sha256=sha256,
            descriptor_digest=digest,
            signer=signer,
            signer_domain=signer_domain,
            descriptor=descriptor,
            fetched_at=at,
            source=bytes(data),
        )
        if sha256_hex(entry.source) != entry.sha256:
            _log.warning("cached source damaged; dropped", domain=domain, stub=name, sha256=entry.sha256)
            self.forget(domain, name)
            return None
        return entry

    def put(self, entry: CacheEntry) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO blobs (sha256, data) VALUES (?, ?)", (entry.sha256, entry.source))
            self._db.execute(
                f"INSERT OR REPLACE INTO stubs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.domain,
                    entry.name,
                    entry.url,
                    entry.etag,
                    entry.fresh_until,
                    entry.version,
                    entry.sha256,
                    entry.descriptor_digest,
                    entry.signer,
                    entry.signer_domain,
                    entry.descriptor,
                    entry.fetched_at,
                ),
            )
            self._collect()

    def touch(self, domain: str, name: str, *, fresh_until: float, etag: str | None) -> None:
        """After a ``304``: the entry is fresh again (and the server may have sent a new ETag)."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE stubs SET fresh_until=?, etag=COALESCE(?, etag) WHERE domain=? AND name=?",
                (fresh_until, etag, domain, name),
            )

    def forget(self, domain: str, name: str | None = None) -> int:
        """Drop one stub of a domain (or all of them when ``name`` is None); return how many."""
        with self._lock, self._db:
            if name is None:
                count = self._db.execute("DELETE FROM stubs WHERE domain=?", (domain,)).rowcount
            else:
                count = self._db.execute("DELETE FROM stubs WHERE domain=? AND name=?", (domain, name)).rowcount
            self._collect()
        return count

    def entries(self) -> list[tuple[str, str, str, str, str | None, float]]:
        """``(domain, name, version, sha256, signer, fetched_at)`` of every cached stub."""
        with self._lock:
            return list(
                self._db.execute(
                    "SELECT domain, name, version, sha256, signer, fetched_at FROM stubs ORDER BY domain, name"
                )
            )

    def _collect(self) -> None:
        self._db.execute("DELETE FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM stubs)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
