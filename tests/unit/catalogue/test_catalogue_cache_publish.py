"""The SQLite stub cache and the publish step (files only, no network)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from protofly.catalogue import PublishError, SigningKey, TrustStore, parse_descriptor, publish, verify_stub
from protofly.catalogue.cache import CACHE_FILE, CacheEntry, StubCache

ROOT = Path(__file__).resolve().parents[3]
ECHO = ROOT / "stubs" / "echo"


def entry(name="default", source=b"x = 1\n", version="1.0.0", **kw):
    digest = hashlib.sha256(source).hexdigest()
    fields = {
        "domain": "b.test",
        "name": name,
        "url": "http://127.0.0.1:1/.well-known/protocolstub/default",
        "etag": '"e"',
        "fresh_until": 10.0,
        "version": version,
        "sha256": digest,
        "descriptor_digest": "d" * 64,
        "signer": "0123456789abcdef",
        "signer_domain": "b.test",
        "descriptor": b'{"objectName":"echo","language":"python"}',
        "fetched_at": 1.0,
        "source": source,
        **kw,
    }
    return CacheEntry(**fields)


def test_put_get_survives_reopen(tmp_path):
    cache = StubCache(tmp_path / CACHE_FILE)
    cache.put(entry())
    cache.close()
    cache = StubCache(tmp_path / CACHE_FILE)
    assert cache.get("b.test", "default") == entry()
    assert cache.get("b.test", "other") is None
    cache.touch("b.test", "default", fresh_until=99.0, etag=None)
    got = cache.get("b.test", "default")
    assert got.fresh_until == 99.0 and got.etag == '"e"'
    cache.close()


def stored_sources(path) -> int:
    """The source blobs in the cache file, as another process (an operator's sqlite3) sees them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]


def test_sources_are_stored_once_and_collected(tmp_path):
    cache = StubCache(tmp_path / CACHE_FILE)
    cache.put(entry("default"))
    cache.put(entry("echo"))
    assert stored_sources(cache.path) == 1
    cache.put(entry("echo", source=b"y = 2\n"))
    assert stored_sources(cache.path) == 2
    assert cache.forget("b.test", "echo") == 1
    assert stored_sources(cache.path) == 1
    assert cache.forget("b.test") == 1
    assert cache.entries() == []
    cache.close()


def test_damaged_blob_is_a_miss(tmp_path):
    cache = StubCache(tmp_path / CACHE_FILE)
    cache.put(entry())
    with contextlib.closing(sqlite3.connect(cache.path)) as db, db:  # the file damaged behind the cache's back
        db.execute("UPDATE blobs SET data = ?", (b"tampered",))
    assert cache.get("b.test", "default") is None
    assert cache.entries() == []
    cache.close()


def test_unreadable_database_is_moved_aside(tmp_path):
    path = tmp_path / CACHE_FILE
    path.write_bytes(b"this is not a database" * 100)
    cache = StubCache(path)
    cache.put(entry())
    assert cache.get("b.test", "default") is not None
    assert list(tmp_path.glob(f"{CACHE_FILE}.corrupt-*"))
    cache.close()


def test_in_memory_cache():
    cache = StubCache(None)
    cache.put(entry())
    assert cache.get("b.test", "default").source == b"x = 1\n"
    cache.close()


def test_schema_of_the_file(tmp_path):
    StubCache(tmp_path / CACHE_FILE).close()
    db = sqlite3.connect(tmp_path / CACHE_FILE)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"blobs", "stubs"}


# -- publish ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key():
    return SigningKey.generate("b.test")


def test_publish_writes_the_static_layout(tmp_path, key):
    path = publish(ECHO, tmp_path / "pub", key, "b.test")
    assert path == tmp_path / "pub" / ".well-known" / "protocolstub" / "echo.ps.json"
    source = path.with_name("echo.ps.py").read_bytes()
    assert source == (ECHO / "stub.py").read_bytes()
    raw = json.loads(path.read_text())
    assert raw["publisher"] == "b.test"
    assert raw["sourcePackage"] == {"sourceCodeClassname": "EchoStub", "sha256": hashlib.sha256(source).hexdigest()}
    assert "sourceFile" not in raw and "sourceCodeClassname" not in raw
    d = parse_descriptor(raw)
    verdict = verify_stub(
        d, source, trust=TrustStore({"b.test": [key.public_raw]}), policy="require", signer_domain="b.test"
    )
    assert verdict.signer == key.key_id
    assert d.sandbox_limits.memory_mb == 128


def test_publish_under_another_name_and_version(tmp_path, key):
    home = SigningKey.generate("a.test")
    path = publish(ECHO, tmp_path, home, "a.test", name="legacy.test", version="3.1")
    raw = json.loads(path.read_text())
    assert path.name == "legacy.test.ps.json" and raw["objectName"] == "legacy.test" and raw["version"] == "3.1"


def test_publish_with_a_key_file(tmp_path, key):
    key_path = tmp_path / "b.test.key"
    key.save(key_path)
    path = publish(ECHO, tmp_path / "pub", key_path, "b.test")
    assert key.key_id in json.loads(path.read_text())["signature"]


def copy_echo(tmp_path, **changes):
    pkg = tmp_path / "pkg"
    shutil.copytree(ECHO, pkg)
    template = json.loads((pkg / "descriptor.json").read_text())
    for k, v in changes.items():
        if v is None:
            template.pop(k, None)
        else:
            template[k] = v
    (pkg / "descriptor.json").write_text(json.dumps(template))
    return pkg


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"version": None}, "version: required"),
        ({"version": 1}, "as a string"),
        ({"sandbox": {"memoryMB": -1}}, "sandbox.memoryMB"),
        ({"configuration": 7}, "configuration"),
        ({"sourceFile": "../x.py"}, "sourceFile"),
        ({"sourceFile": "missing.py"}, "cannot read"),
    ],
)
def test_publish_rejects_bad_packages(tmp_path, key, changes, words):
    with pytest.raises(PublishError) as info:
        publish(copy_echo(tmp_path, **changes), tmp_path / "pub", key, "b.test")
    assert words in str(info.value)
    assert not (tmp_path / "pub" / ".well-known" / "protocolstub" / "echo.ps.json").exists()


def test_publish_rejects_a_key_of_another_domain(tmp_path, key):
    with pytest.raises(PublishError, match="belongs to b.test"):
        publish(ECHO, tmp_path, key, "c.test")


def test_publish_needs_a_template(tmp_path, key):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="descriptor.json"):
        publish(tmp_path / "empty", tmp_path / "pub", key, "b.test")
