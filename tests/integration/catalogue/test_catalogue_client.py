"""The catalogue client against real servers on 127.0.0.1 (ours, a plain static one, misbehaving ones)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import shutil

import pytest

from protofly.catalogue import (
    E_CHANGED,
    E_DIGEST,
    E_FETCH,
    E_INSECURE,
    E_ROLLBACK,
    E_SCHEMA,
    E_SIGNATURE,
    E_TOO_LARGE,
    E_UNSIGNED,
    E_UNTRUSTED,
    CatalogueError,
    SigningKey,
    publish,
)

from .conftest import CONFORMANCE_DEFAULT, ECHO, FIFTY_MIB

ECHO_SOURCE = (ECHO / "stub.py").read_bytes()
DEFAULT_PATH = "/.well-known/protocolstub/default"


async def fails(coro, code):
    with pytest.raises(CatalogueError) as info:
        await coro
    assert info.value.code == code, str(info.value)
    return info.value


# -- happy paths ------------------------------------------------------------------------------------------


async def test_catalogue_layout_happy_path(catalogue_dir, start_server, open_client, keys):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    stub = await client.fetch_stub("b.test")
    assert stub.source == ECHO_SOURCE
    assert stub.url == server.base_url + DEFAULT_PATH
    assert stub.signer == keys["b.test"].key_id and stub.signer_domain == "b.test"
    assert not stub.from_cache and not stub.offline
    assert stub.descriptor.object_name == "echo" and stub.descriptor.version == "1.0.0"
    assert stub.descriptor.source_classname == "EchoStub"
    assert stub.descriptor.sandbox_limits.memory_mb == 128
    timings = stub.timings.as_dict()
    assert set(timings) == {"download", "verify", "cache", "total"}
    assert timings["total"] >= timings["download"] > 0
    assert server.requests == {DEFAULT_PATH: 1}  # descriptor and source in one response


async def test_static_layout_on_a_plain_web_server(catalogue_dir, static_server, open_client, keys):
    base = await static_server(catalogue_dir)
    client = await open_client({"b.test": base})
    stub = await client.fetch_stub("https://b.test/.well-known/protocolstub/echo.ps.json")
    assert stub.source == ECHO_SOURCE
    assert stub.url == base + "/.well-known/protocolstub/echo.ps.json"
    assert stub.name == "echo" and stub.signer == keys["b.test"].key_id


async def test_static_layout_after_the_catalogue_layout_fails(tmp_path, keys, static_server, open_client):
    publish(ECHO, tmp_path / "pub", keys["b.test"], "b.test", name="default")
    base = await static_server(tmp_path / "pub")  # no catalogue layout here: /default is a 404
    client = await open_client({"b.test": base})
    stub = await client.fetch_stub("b.test")
    assert stub.url.endswith("/default.ps.json") and stub.source == ECHO_SOURCE


async def test_catalogue_url_reference(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    stub = await client.fetch_stub("hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/echo")
    assert stub.url == server.base_url + "/.well-known/protocolstub/echo"
    assert stub.name == "echo"


async def test_unknown_domain_falls_back_to_the_home_catalogue(tmp_path, keys, start_server, open_client):
    publish(ECHO, tmp_path / "home", keys["a.test"], "a.test", name="unknown.test")
    home = await start_server(tmp_path / "home")
    client = await open_client({"a.test": home.base_url})
    stub = await client.fetch_stub("unknown.test")
    assert stub.url == home.base_url + "/.well-known/protocolstub/unknown.test"
    assert stub.signer_domain == "a.test" and stub.signer == keys["a.test"].key_id
    assert stub.descriptor.object_name == "unknown.test"


async def test_domain_whose_catalogue_has_no_stub_falls_back(tmp_path, keys, start_server, open_client):
    (tmp_path / "empty").mkdir()
    empty = await start_server(tmp_path / "empty")
    publish(ECHO, tmp_path / "home", keys["a.test"], "a.test", name="c.test")
    home = await start_server(tmp_path / "home")
    client = await open_client({"c.test": empty.base_url, "a.test": home.base_url})
    stub = await client.fetch_stub("c.test")
    assert stub.signer_domain == "a.test"
    assert empty.responses["(unknown)", 404] == 2  # catalogue layout, then static layout


# -- the catalogue is down ------------------------------------------------------------------------------


async def test_catalogue_down_serves_the_cached_stub(catalogue_dir, start_server, open_client, state_dir):
    server = await start_server(catalogue_dir)
    resolver = {"b.test": server.base_url}
    client = await open_client(resolver)
    first = await client.fetch_stub("b.test")
    await server.stop()
    again = await client.fetch_stub("b.test")
    assert again.offline and again.from_cache and again.source == first.source and again.sha256 == first.sha256
    # A restarted runtime (a new client on the same state directory) deploys it too.
    restarted = await open_client(resolver)
    stub = await restarted.fetch_stub("b.test")
    assert stub.offline and stub.source == ECHO_SOURCE and stub.signer == first.signer
    assert restarted.stats.offline_hits == 1


async def test_catalogue_down_and_nothing_cached(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    base = server.base_url
    await server.stop()
    client = await open_client({"b.test": base})
    error = await fails(client.fetch_stub("b.test"), E_FETCH)
    assert base + DEFAULT_PATH in str(error) and "nothing is cached" in str(error)
    assert "not in the resolver map" in str(error)  # the home fallback was refused, not attempted
    assert client.stats.failures[E_FETCH] == 1


@pytest.mark.parametrize(
    ("mode", "code", "words"), [("error500", E_FETCH, "HTTP 500"), ("garbage", E_SCHEMA, "not valid JSON")]
)
async def test_broken_catalogue(bad_server, open_client, mode, code, words):
    client = await open_client({"b.test": bad_server.url(mode)})
    error = await fails(client.fetch_stub("b.test"), code)
    assert words in str(error)


async def test_broken_catalogue_with_a_cached_stub(catalogue_dir, start_server, bad_server, open_client):
    server = await start_server(catalogue_dir)
    await (await open_client({"b.test": server.base_url})).fetch_stub("b.test")
    for mode in ("error500", "garbage"):
        client = await open_client({"b.test": bad_server.url(mode)})
        stub = await client.fetch_stub("b.test")
        assert stub.offline and stub.source == ECHO_SOURCE


async def test_fifty_mib_body_is_cut_off(bad_server, open_client):
    client = await open_client({"b.test": bad_server.url("huge")}, max_size=1 << 20)
    error = await fails(client.fetch_stub("b.test"), E_TOO_LARGE)
    assert "cut off" in str(error)
    await asyncio.wait_for(bad_server.huge_done.wait(), 10)
    assert not bad_server.huge_finished
    assert bad_server.huge_sent < FIFTY_MIB // 2


async def test_declared_fifty_mib_is_refused_before_reading(bad_server, open_client):
    client = await open_client({"b.test": bad_server.url("declared")}, max_size=1 << 20)
    error = await fails(client.fetch_stub("b.test"), E_TOO_LARGE)
    assert str(FIFTY_MIB) in str(error)
    assert client.stats.bytes_downloaded == 0


async def test_compressed_body_is_limited_after_decompression(bad_server, open_client):
    client = await open_client({"b.test": bad_server.url("gzip")}, max_size=1 << 20)
    error = await fails(client.fetch_stub("b.test"), E_TOO_LARGE)
    assert "cut off" in str(error)


async def test_catalogue_that_never_answers(silent_server, open_client):
    client = await open_client({"b.test": silent_server.base}, read_timeout=0.2, total_timeout=1.0)
    error = await fails(client.fetch_stub("b.test"), E_FETCH)
    assert "timed out" in str(error)
    assert silent_server.connections >= 1


async def test_redirects_are_bounded(bad_server, open_client):
    client = await open_client({"b.test": bad_server.url("loop")}, max_redirects=2)
    error = await fails(client.fetch_stub("b.test"), E_FETCH)
    assert "more than 2 redirects" in str(error)
    assert client.stats.requests == 2 * 3  # two candidates, each 1 request + 2 redirects


async def test_a_redirect_is_followed_and_checked(catalogue_dir, start_server, bad_server, open_client):
    server = await start_server(catalogue_dir)
    bad_server.target = server.base_url
    client = await open_client({"b.test": bad_server.url("redirect")})
    stub = await client.fetch_stub("b.test")
    assert stub.url == server.base_url + DEFAULT_PATH and stub.source == ECHO_SOURCE


# -- transport policy ------------------------------------------------------------------------------------


async def test_plain_http_needs_the_opt_in(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url}, allow_http_loopback=False)
    error = await fails(client.fetch_stub("b.test"), E_INSECURE)
    assert "allow_http_loopback" in str(error)
    assert server.requests == {}


async def test_plain_http_only_to_loopback(open_client):
    client = await open_client({"b.test": "http://catalogue.example.net"}, resolver_only=False)
    # Every candidate is refused before any connection (no address outside 127.0.0.0/8 is touched).
    error = await fails(
        client.fetch_stub("hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/echo"), E_INSECURE
    )
    assert "only to loopback" in str(error)


async def test_tls_is_verified(catalogue_dir, start_server, open_client, server_tls, client_tls):
    server = await start_server(catalogue_dir, ssl_context=server_tls)
    assert server.base_url.startswith("https://")
    strict = await open_client({"b.test": server.base_url}, allow_http_loopback=False)
    error = await fails(strict.fetch_stub("b.test"), E_FETCH)
    assert "TLS verification failed" in str(error) or "certificate" in str(error).lower()
    trusting = await open_client({"b.test": server.base_url}, allow_http_loopback=False, ssl_context=client_tls)
    stub = await trusting.fetch_stub("b.test")
    assert stub.url.startswith("https://127.0.0.1:") and stub.source == ECHO_SOURCE


# -- verification -----------------------------------------------------------------------------------------


async def test_tampered_source(catalogue_dir, start_server, static_server, open_client):
    source = catalogue_dir / ".well-known" / "protocolstub" / "echo.ps.py"
    source.write_bytes(source.read_bytes() + b"\nimport os; os.system('evil')\n")
    base = await static_server(catalogue_dir)
    client = await open_client({"b.test": base})
    error = await fails(client.fetch_stub("https://b.test/.well-known/protocolstub/echo.ps.json"), E_DIGEST)
    assert "echo" in str(error) and base in str(error)
    server = await start_server(catalogue_dir)  # the catalogue layout embeds the tampered source
    client = await open_client({"b.test": server.base_url}, state_dir=None)
    await fails(client.fetch_stub("b.test"), E_DIGEST)


async def test_wrong_signature(catalogue_dir, start_server, open_client):
    path = catalogue_dir / ".well-known" / "protocolstub" / "echo.ps.json"
    raw = json.loads(path.read_text())
    raw["configuration"]["greeting"] = "tampered"
    path.write_text(json.dumps(raw))
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    await fails(client.fetch_stub("b.test"), E_SIGNATURE)


async def test_untrusted_key(tmp_path, start_server, open_client):
    rogue = SigningKey.generate("b.test")
    publish(ECHO, tmp_path / "pub", rogue, "b.test")
    server = await start_server(tmp_path / "pub")
    client = await open_client({"b.test": server.base_url})
    error = await fails(client.fetch_stub("b.test"), E_UNTRUSTED)
    assert rogue.key_id in str(error)


@pytest.fixture
def rethink_dir(tmp_path):
    """reTHINK's own unsigned static artefact (conformance data) with a stand-in source next to it."""
    folder = tmp_path / "rethink" / ".well-known" / "protocolstub"
    folder.mkdir(parents=True)
    shutil.copy(CONFORMANCE_DEFAULT, folder / "default.ps.json")
    (folder / "default.ps.js").write_text("export default class VertxProtoStub {}\n")
    return tmp_path / "rethink"


async def test_unsigned_rethink_artefact_under_require(rethink_dir, start_server, open_client):
    server = await start_server(rethink_dir, default=None)
    client = await open_client({"b.test": server.base_url})
    error = await fails(client.fetch_stub("b.test"), E_UNSIGNED)
    assert "policy is 'require'" in str(error)


async def test_unsigned_rethink_artefact_under_warn(rethink_dir, start_server, open_client, caplog):
    server = await start_server(rethink_dir, default=None)
    client = await open_client({"b.test": server.base_url}, policy="warn")
    with caplog.at_level(logging.WARNING, logger="protofly.catalogue"):
        stub = await client.fetch_stub("b.test")
    assert stub.signer is None
    assert stub.descriptor.language == "javascript"
    assert stub.source == b"export default class VertxProtoStub {}\n"
    assert any("UNSIGNED" in w for w in stub.warnings)
    assert any("UNSIGNED" in r.getMessage() for r in caplog.records)
    # A later 'require' client refuses the cached unsigned stub too.
    strict = await open_client({"b.test": server.base_url})
    await fails(strict.fetch_stub("b.test"), E_UNSIGNED)


# -- revalidation, freshness, rollback, changed bytes ------------------------------------------------------


async def test_revalidation_is_a_304_without_the_body(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)  # Cache-Control: no-cache
    client = await open_client({"b.test": server.base_url})
    first = await client.fetch_stub("b.test")
    downloaded = client.stats.bytes_downloaded
    second = await client.fetch_stub("b.test")
    assert second.revalidated and second.from_cache and not second.offline
    assert second.source == first.source
    assert server.responses[DEFAULT_PATH, 200] == 1
    assert server.responses[DEFAULT_PATH, 304] == 1
    assert client.stats.bytes_downloaded == downloaded
    assert client.stats.not_modified == 1


async def test_fresh_cache_makes_no_request(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir, max_age=60)
    client = await open_client({"b.test": server.base_url})
    await client.fetch_stub("b.test")
    stub = await client.fetch_stub("b.test")
    assert stub.from_cache and not stub.revalidated
    assert server.requests[DEFAULT_PATH] == 1
    await client.fetch_stub("b.test", refresh=True)
    assert server.responses[DEFAULT_PATH, 304] == 1


async def test_new_version_is_accepted(tmp_path, keys, echo_package, start_server, open_client):
    publish(echo_package(version="1.0.0"), tmp_path / "pub", keys["b.test"], "b.test")
    server = await start_server(tmp_path / "pub")
    client = await open_client({"b.test": server.base_url})
    await client.fetch_stub("b.test")
    publish(echo_package(version="1.1.0", extra_source="# 1.1\n"), tmp_path / "pub", keys["b.test"], "b.test")
    assert await server.reload() == []
    stub = await client.fetch_stub("b.test")
    assert stub.version == "1.1.0" and stub.source.endswith(b"# 1.1\n") and not stub.from_cache


async def test_rollback_is_refused_until_forgotten(tmp_path, keys, echo_package, start_server, open_client):
    publish(echo_package(version="2.0.0"), tmp_path / "pub", keys["b.test"], "b.test")
    server = await start_server(tmp_path / "pub")
    client = await open_client({"b.test": server.base_url})
    await client.fetch_stub("b.test")
    publish(echo_package(version="1.9.0"), tmp_path / "pub", keys["b.test"], "b.test")
    await server.reload()
    error = await fails(client.fetch_stub("b.test"), E_ROLLBACK)
    assert "1.9.0" in str(error) and "2.0.0" in str(error) and "forget" in str(error)
    assert await client.forget("b.test") == 1
    assert (await client.fetch_stub("b.test")).version == "1.9.0"


async def test_changed_bytes_under_the_same_version(tmp_path, keys, echo_package, start_server, open_client):
    publish(echo_package(), tmp_path / "pub", keys["b.test"], "b.test")
    server = await start_server(tmp_path / "pub")
    client = await open_client({"b.test": server.base_url})
    first = await client.fetch_stub("b.test")
    publish(echo_package(extra_source="# quietly changed\n"), tmp_path / "pub", keys["b.test"], "b.test")
    await server.reload()
    error = await fails(client.fetch_stub("b.test"), E_CHANGED)
    assert "same version 1.0.0" in str(error)
    cached = await client.cached("b.test")
    assert cached.sha256 == first.sha256  # the cache kept what was verified first


async def test_concurrent_fetches_of_one_stub(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    stubs = await asyncio.wait_for(asyncio.gather(*(client.fetch_stub("b.test") for _ in range(5))), 10)
    assert {s.sha256 for s in stubs} == {stubs[0].sha256}
    assert server.responses[DEFAULT_PATH, 200] == 1  # the others revalidated


async def test_bad_reference(open_client):
    client = await open_client({})
    error = await fails(client.fetch_stub("not a domain"), E_SCHEMA)
    assert "not a domain" in str(error)


def _live_locks() -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if isinstance(thing, asyncio.Lock))


async def test_per_stub_serialisation_keeps_nothing_per_reference(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    await client.fetch_stub("b.test")
    before = _live_locks()
    for n in range(200):
        await fails(client.fetch_stub(f"https://b.test/.well-known/protocolstub/missing-{n}"), E_FETCH)
    await asyncio.gather(*(client.fetch_stub("b.test") for _ in range(20)))
    assert _live_locks() - before < 10


async def test_a_fetched_stub_and_its_timings_are_immutable(catalogue_dir, start_server, open_client):
    server = await start_server(catalogue_dir)
    client = await open_client({"b.test": server.base_url})
    stub = await client.fetch_stub("b.test")
    with pytest.raises(TypeError):
        stub.timings["total"] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stub.timings.total = 0.0  # type: ignore[misc]
    again = await client.fetch_stub("b.test")
    assert again.timings.total > 0 and stub.timings.total > 0
