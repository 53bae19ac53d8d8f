"""The catalogue server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from tests.polling import wait_until

from protofly.catalogue import (
    E_DIGEST,
    CatalogueError,
    parse_descriptor,
    parse_source_package,
    publish,
    verify_stub,
)

from .conftest import ECHO

ECHO_SOURCE = (ECHO / "stub.py").read_bytes()
PS = "/.well-known/protocolstub"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http, url, **headers):
    async with http.get(url, headers=headers, allow_redirects=False) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_listing_and_types(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    status, headers, body = await get(http, server.base_url + PS)
    assert status == 200 and json.loads(body) == ["echo"]
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads((await get(http, server.base_url + "/.well-known/"))[2]) == ["protocolstub", "sourcepackage"]


async def test_catalogue_layout_descriptor_embeds_the_source(catalogue_dir, start_server, http, trust):
    server = await start_server(catalogue_dir)
    for name in ("echo", "default"):
        status, headers, body = await get(http, f"{server.base_url}{PS}/{name}")
        assert status == 200
        assert headers["ETag"].startswith('"') and headers["Cache-Control"] == "no-cache"
        assert headers["Access-Control-Allow-Origin"] == "*"
        descriptor = parse_descriptor(body)
        source, _ = descriptor.source_package.decode()
        assert source == ECHO_SOURCE
        assert verify_stub(descriptor, source, trust=trust, policy="require", signer_domain="b.test").signer


async def test_static_layout_serves_the_published_files(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    folder = catalogue_dir / ".well-known" / "protocolstub"
    status, _, body = await get(http, f"{server.base_url}{PS}/echo.ps.json")
    assert status == 200 and body == (folder / "echo.ps.json").read_bytes()
    status, headers, body = await get(http, f"{server.base_url}{PS}/echo.ps.py")
    assert status == 200 and body == ECHO_SOURCE and headers["Content-Type"].startswith("text/x-python")
    assert (await get(http, f"{server.base_url}{PS}/default.ps.json"))[2] == (folder / "echo.ps.json").read_bytes()


async def test_fields_and_source_package(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    status, headers, body = await get(http, f"{server.base_url}{PS}/echo/version")
    assert (status, body) == (200, b"1.0.0") and headers["Content-Type"].startswith("text/plain")
    assert json.loads((await get(http, f"{server.base_url}{PS}/echo/configuration"))[2]) == {
        "greeting": "hello from echo"
    }
    assert (await get(http, f"{server.base_url}{PS}/echo/interworking"))[2] == b"false"
    status, _, body = await get(http, f"{server.base_url}/.well-known/sourcepackage/EchoStub")
    package = parse_source_package(body)
    assert status == 200 and package.classname == "EchoStub" and package.decode()[0] == ECHO_SOURCE
    assert (await get(http, f"{server.base_url}/.well-known/sourcepackage/EchoStub/sourceCode"))[2] == ECHO_SOURCE
    assert (await get(http, f"{server.base_url}/.well-known/protostub/echo/version"))[2] == b"1.0.0"


async def test_if_none_match_gives_304(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    url = f"{server.base_url}{PS}/echo"
    _, headers, _ = await get(http, url)
    etag = headers["ETag"]
    status, headers, body = await get(http, url, **{"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    assert (await get(http, url, **{"If-None-Match": f'"other", W/{etag}'}))[0] == 304
    assert (await get(http, url, **{"If-None-Match": "*"}))[0] == 304
    assert (await get(http, url, **{"If-None-Match": '"other"'}))[0] == 200
    assert server.responses[f"{PS}/echo", 304] == 3 and server.responses[f"{PS}/echo", 200] == 2


async def test_unknown_names_are_404_with_a_json_body(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    for path in (f"{PS}/nope", f"{PS}/echo/nofield", "/.well-known/sourcepackage/Nope", "/index.html"):
        status, headers, body = await get(http, server.base_url + path)
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        error = json.loads(body)
        assert error["code"] == 404 and path in error["description"]
    assert server.requests["(unknown)"] == 4


async def test_other_methods_are_405(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        async with http.request(method, f"{server.base_url}{PS}/echo", data=b"{}") as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
            assert (await resp.json())["error"] == "method not allowed"


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT example.com:443", b"OPTIONS *", b"OPTIONS /", b"BREW /.well-known/protocolstub/echo", b"TRACE /x"],
)
async def test_every_other_method_is_405_with_allow_even_connect_and_unknown_ones(
    catalogue_dir, start_server, request_line
):
    server = await start_server(catalogue_dir)
    answer = await raw_exchange(server.port, request_line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), answer
    assert b"\r\nAllow: GET, HEAD\r\n" in head + b"\r\n"
    error = json.loads(body)
    assert error["code"] == 405 and request_line.split()[0].decode() in error["description"]
    assert server.responses["(unknown)", 405] + server.responses[f"{PS}/echo", 405] == 1


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"F@O / HTTP/1.1\r\nHost: x", b"400"),  # a method that is not a token
        (b"GET / HTTP/2.0\r\nHost: x", b"505"),
        (b"GET / HTTP/1.1\r\n folded: x", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5x", b"400"),
        (b"GET / HTTP/1.1\r\nBad\x01: x", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"Host: x", b"431"),
    ],
)
async def test_a_malformed_request_head_is_answered_and_counted(catalogue_dir, start_server, request_head, status):
    server = await start_server(catalogue_dir)
    answer = await raw_exchange(server.port, request_head + b"\r\n\r\n")
    assert answer.split(b" ", 2)[1] == status, answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == int(status)
    assert server.responses["(unknown)", int(status)] == 1


async def test_half_sent_requests_are_answered_408_and_closed_after_the_header_timeout(catalogue_dir, start_server):
    server = await start_server(catalogue_dir, header_timeout=0.3)
    halves = [b"G", b"GET /.well-known HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a"]
    conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3 * len(halves))]
    for index, (_, writer) in enumerate(conns):
        writer.write(halves[index % len(halves)])
        await writer.drain()
    try:
        # The server closes every one of them by itself: read() returns at EOF, well before this bound.
        answers = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in conns)), 10)
    finally:
        for _, writer in conns:
            writer.close()
    assert all(answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer for answer in answers)
    assert server.responses["(unknown)", 408] == len(conns)
    await wait_until(lambda: server.connections == 0)


async def test_an_idle_keep_alive_connection_is_closed_silently(catalogue_dir, start_server):
    server = await start_server(catalogue_dir, idle_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /.well-known HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)  # one response, then EOF once idle
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'["protocolstub","sourcepackage"]')
    assert server.responses["/.well-known", 200] == 1


async def test_head(catalogue_dir, start_server, http):
    server = await start_server(catalogue_dir)
    async with http.head(f"{server.base_url}{PS}/echo") as resp:
        assert resp.status == 200 and resp.headers["ETag"] and await resp.read() == b""


async def test_request_size_is_bounded(catalogue_dir, start_server):
    server = await start_server(catalogue_dir)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] in (b"400", b"414", b"431")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}{PS}/echo", headers={"X-Big": "x" * 10_000}) as resp:
            assert resp.status in (400, 431)


async def test_default_alias_from_config_file_and_reload(tmp_path, keys, start_server, http):
    directory = tmp_path / "pub"
    publish(ECHO, directory, keys["b.test"], "b.test")
    (directory / "catalogue.json").write_text(json.dumps({"default": "echo", "maxAge": 30}))
    server = await start_server(directory, default=None)
    status, headers, _ = await get(http, f"{server.base_url}{PS}/default")
    assert status == 200 and headers["Cache-Control"] == "public, max-age=30"
    publish(ECHO, directory, keys["b.test"], "b.test", name="second")
    assert (await get(http, f"{server.base_url}{PS}/second"))[0] == 404
    assert await server.reload() == []
    assert (await get(http, f"{server.base_url}{PS}/second"))[0] == 200
    assert server.names == ["echo", "second"]


async def test_broken_entries_are_reported(tmp_path, keys, start_server, http, open_client):
    directory = tmp_path / "pub"
    publish(ECHO, directory, keys["b.test"], "b.test")
    publish(ECHO, directory, keys["b.test"], "b.test", name="tampered")
    folder = directory / ".well-known" / "protocolstub"
    (folder / "tampered.ps.py").write_bytes(b"evil = True\n")
    (folder / "broken.ps.json").write_text(
        '{"objectName": "broken", "language": "python", "sandbox": {"memoryMB": -1}}'
    )
    server = await start_server(directory, default="missing")
    assert server.names == ["echo", "tampered"]  # the broken descriptor is skipped
    problems = "\n".join(server.problems)
    assert "sandbox.memoryMB" in problems and "tampered.ps.py" in problems and "'missing'" in problems
    assert (await get(http, f"{server.base_url}{PS}/broken"))[0] == 404
    # The tampered source is served as it is on disk, and the client refuses it.
    client = await open_client({"b.test": server.base_url})
    with pytest.raises(CatalogueError) as info:
        await client.fetch_stub("hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/tampered")
    assert info.value.code == E_DIGEST


async def test_binary_source_is_embedded_as_base64(tmp_path, keys, start_server, http, echo_package):
    pkg = echo_package()
    (pkg / "stub.py").write_bytes(b"\xff\xfe binary")
    publish(pkg, tmp_path / "pub", keys["b.test"], "b.test")
    server = await start_server(tmp_path / "pub")
    package = json.loads((await get(http, f"{server.base_url}{PS}/echo"))[2])["sourcePackage"]
    assert package["encoding"] == "base64" and base64.b64decode(package["sourceCode"]) == b"\xff\xfe binary"


@pytest.mark.parametrize(
    "config",
    [b"[" * 100_000, b'{"maxAge": ' + b"9" * 5000 + b"}", b'{"default": "\xff"}', b'{"default": ["echo"]}'],
    ids=["deep", "huge", "utf8", "wrong-type"],
)
async def test_a_broken_catalogue_config_is_a_problem_not_a_crash(catalogue_dir, start_server, http, config):
    (catalogue_dir / "catalogue.json").write_bytes(config)
    server = await start_server(catalogue_dir, default=None)
    assert (await get(http, f"{server.base_url}{PS}/echo"))[0] == 200  # the stubs are served all the same
    if config != b'{"default": ["echo"]}':
        assert any("catalogue.json: unreadable config" in problem for problem in server.problems), server.problems
