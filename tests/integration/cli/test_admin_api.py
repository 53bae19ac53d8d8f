"""The admin API over its real unix socket, in-process: error answers, the deploy stream, the socket's life."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from protofly.admin.client import AdminClient
from protofly.admin.protocol import AdminError, AdminUnavailableError, admin_socket
from protofly.admin.server import AdminServer
from protofly.config import RuntimeConfig
from protofly.message import response
from protofly.runtime import Runtime


@contextlib.asynccontextmanager
async def serving(world, tmp_path: Path, **overrides) -> AsyncIterator[tuple[Runtime, AdminServer]]:
    settings = {
        "domain": "a.test",
        "state_dir": tmp_path / "state",
        "catalogues": {d: s.base_url for d, s in world.servers.items()},
        "trust_store": world.trust_file,
        "allow_http_loopback": True,
        "resolver_only": True,
        "sandbox": "in-process",  # the stream and the errors are under test here, not the isolation
        "deploy_timeout": 10.0,
        **overrides,
    }
    config = RuntimeConfig(**settings)
    server = AdminServer(tmp_path / "admin.sock", max_request_size=config.max_message_size)
    await server.claim()
    try:
        async with Runtime(config) as runtime:
            await server.start(runtime)
            yield runtime, server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def raw(path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(
        "http://admin", connector=connector, timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        yield session


async def call(session: aiohttp.ClientSession, method: str, path: str, **kwargs) -> tuple[int, dict]:
    async with session.request(method, path, **kwargs) as response:
        return response.status, json.loads(await response.read())


async def test_every_error_is_json_naming_the_problem(world, tmp_path):
    async with serving(world, tmp_path) as (_, server), raw(server.path) as session:
        cases = [
            ("GET", "/nothing", {}, 404, None, "Not Found"),
            ("PUT", "/stubs", {}, 405, None, "Method Not Allowed"),
            ("DELETE", "/stubs/bad!domain", {}, 400, "domain", "invalid"),
            ("DELETE", "/stubs/b.test", {}, 404, "domain", "no stub is loaded for b.test"),
            ("POST", "/stubs/x.test/retry", {}, 404, "domain", "no stub is loaded for x.test"),
            ("POST", "/stubs/" + quote("https://b.test/somewhere/else", safe=""), {}, 400, "reference", "protocolstub"),
            ("POST", "/send", {"data": b"{nope"}, 400, "body", "not a valid JSON"),
            ("POST", "/send", {"data": b'{"type":"read","to":"x://y","body":' + b"[" * 5000}, 400, "body", "deep"),
            ("POST", "/send", {"data": b'{"type":"read","to":"x://\xff"}'}, 400, "body", "invalid UTF-8"),
            ("POST", "/send", {"data": b'{"type":"read","to":"x://y","body":{"n":NaN}}'}, 400, "body", "JSON"),
            (
                "POST",
                "/send",
                {"data": b'{"type":"read","to":"x://y","id":1' + b"0" * 5000 + b"}"},
                400,
                "body",
                "range",
            ),
            ("POST", "/send", {"data": b'{"type":"read","to":"x://y","body":' + b"9" * 5000 + b"}"}, 400, "body", ""),
            ("POST", "/send", {"data": b"[1]"}, 400, "body", "expected a JSON object"),
            ("POST", "/send", {"json": {"type": "read"}}, 400, "to", "to: missing"),
            ("POST", "/send", {"json": {"type": "sh out", "to": "x://y"}}, 400, "type", "not a message type"),
            ("POST", "/send", {"json": {"type": 5, "to": "x://y"}}, 400, "type", "Expected `str`"),
            ("POST", "/send", {"json": {"type": "response", "to": "x://y"}}, 400, "type", "cannot be sent"),
            ("POST", "/send", {"json": {"to": "x://y"}}, 400, "type", "type: missing"),
            ("POST", "/send?timeout=abc", {"json": {}}, 400, "timeout", "not a number"),
            ("POST", "/send?timeout=0", {"json": {}}, 400, "timeout", "must be in"),
            ("POST", "/send?timeout=301", {"json": {}}, 400, "timeout", "must be in"),
            ("POST", "/send", {"data": b" " * (2 << 20)}, 413, None, "Maximum request body size"),
        ]
        for method, path, kwargs, status, field, words in cases:
            got, body = await call(session, method, path, **kwargs)
            assert (got, body["code"], body.get("field")) == (status, status, field), (path, body)
            assert words in body["error"], (path, body)


async def test_send_is_bounded_and_answers_with_the_response(world, tmp_path, make_inbox):
    async with serving(world, tmp_path) as (runtime, server), AdminClient(server.path) as client:
        silent = make_inbox()
        runtime.bus.add_listener("hyperty://a.test/silent", silent)
        answer = await client.send({"type": "read", "to": "hyperty://a.test/silent"}, timeout=0.2)
        assert answer["body"]["code"] == 408 and answer["to"] == f"{runtime.runtime_url}/cli"
        assert silent[0].from_ == f"{runtime.runtime_url}/cli"
        answer = await client.send({"type": "create", "to": "hyperty://b.test/x", "body": {"k": 1}, "id": 7})
        assert answer["id"] == 7 and answer["body"]["code"] == 200 and answer["body"]["value"] == {"k": 1}


async def test_send_routes_any_message_type(world, tmp_path):
    async with serving(world, tmp_path) as (runtime, server), AdminClient(server.path) as client:
        seen = []

        def pong(msg):
            seen.append(msg.type)
            runtime.bus.post(response(msg, 200, value={"pong": msg.body["n"]}))

        runtime.bus.add_listener("hyperty://a.test/pinged", pong)
        answer = await client.send({"type": "PING", "to": "hyperty://a.test/pinged", "body": {"n": 3}})
        assert answer["body"] == {"code": 200, "value": {"pong": 3}} and seen == ["ping"]


async def test_deploy_stream_reports_steps_and_statuses_in_order(world, tmp_path):
    async with serving(world, tmp_path) as (runtime, server), AdminClient(server.path) as client:
        events = [event async for event in client.deploy("b.test")]
        kinds = [(e["event"], e.get("step") or e.get("value")) for e in events]
        assert kinds[0] == ("status", "deploying") and kinds[-1][0] == "result"
        steps = [name for kind, name in kinds if kind == "step"]
        assert steps == ["registry", "catalogue", "sandbox", "connect", "live"]
        statuses = [name for kind, name in kinds if kind == "status"]
        assert statuses[-1] == "live" and "deployed" in statuses
        assert all(e["domain"] == "b.test" for e in events)
        assert [e["at"] for e in events[:-1]] == sorted(e["at"] for e in events[:-1])
        result = events[-1]
        assert result["ok"] is True and result["url"] == runtime.registry.stub("b.test").url
        assert result["history"][-1]["value"] == "live" and result["total_ms"] > 0

        unloaded = await client.unload("b.test")
        assert unloaded["url"] == result["url"] and runtime.registry.stub("b.test") is None
        assert await client.stubs() == []
        failed = [event async for event in client.deploy("c.test")]
        assert failed[-1]["ok"] is False and failed[-1]["cause"] == "E_UNTRUSTED"
        assert failed[-1]["history"][-1]["value"] == "deployment-failed"
        (listed,) = await client.stubs()
        assert listed["domain"] == "c.test" and listed["status"] == "deployment-failed"
        info = await client.runtime()
        assert info["runtime_url"] == runtime.runtime_url and info["config"]["sandbox"] == "in-process"


async def test_a_client_that_goes_away_does_not_stop_the_deployment(world, tmp_path):
    async with serving(world, tmp_path) as (runtime, server), AdminClient(server.path) as client:
        stream = client.deploy("b.test")
        first = await anext(stream)
        assert first["event"] == "status"
        await stream.aclose()
        record = runtime.registry.stub("b.test")
        await runtime.registry.wait_for_status(record, ["live"], 10)
        assert (await runtime.load_stub("b.test")).status == "live"


async def test_the_socket_is_private_exclusive_and_cleaned_up(tmp_path):
    path = tmp_path / "run" / "admin.sock"
    first = AdminServer(path)
    await first.claim()  # creates the missing directory
    assert path.stat().st_mode & 0o777 == 0o600
    second = AdminServer(path)
    with pytest.raises(AdminError, match="already listening") as refused:
        await second.claim()
    assert refused.value.status == 409
    await first.close()
    assert not path.exists()

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    third = AdminServer(path)
    await third.claim()  # a socket file nobody listens on is replaced
    os.rename(path, tmp_path / "moved.sock")
    replacement = socket.socket(socket.AF_UNIX)
    replacement.bind(str(path))
    await third.close()
    assert path.exists()  # somebody else's socket by now: not ours to delete
    replacement.close()

    path.unlink()
    path.write_text("data")
    with pytest.raises(AdminError, match="is not a socket"):
        await AdminServer(path).claim()
    assert path.read_text() == "data"
    deep = tmp_path / ("x" * 120) / "admin.sock"
    with pytest.raises(AdminError, match="over the 107-byte limit"):
        await AdminServer(deep).claim()


async def test_client_without_a_runtime(tmp_path):
    async with AdminClient(tmp_path / "none.sock") as client:
        with pytest.raises(AdminUnavailableError, match="protofly runtime serve"):
            await client.stubs()
        with pytest.raises(AdminUnavailableError):
            await asyncio.wait_for(anext(client.deploy("b.test")), 10)


def test_socket_location_rule(tmp_path):
    env = {"PROTOFLY_ADMIN": "/run/pf.sock"}
    assert admin_socket(admin="/a.sock", state_dir=tmp_path, environ=env) == Path("/a.sock")
    assert admin_socket(state_dir=tmp_path, environ=env) == Path("/run/pf.sock")
    assert admin_socket(state_dir=tmp_path, environ={}) == tmp_path / "admin.sock"
    assert admin_socket(environ={}) is None


async def test_credentials_are_replaced_through_the_api_and_bad_bodies_are_named(world, tmp_path):
    async with serving(world, tmp_path) as (runtime, server), AdminClient(server.path) as client:
        assert not runtime.identity.has("b.test")
        assert await client.set_credentials("b.test", {"password": "s3cret"}) == {
            "domain": "b.test",
            "credentials": "set",
        }
        assert runtime.identity.credentials_for("b.test") == {"password": "s3cret"}
        async with raw(server.path) as session:
            bodies = [
                (b"[1, 2]", "JSON object"),
                (b"{nope", "not a valid JSON"),
                (b"[" * 5000, "nested too deeply"),
                (b'{"password": NaN}', "not a valid JSON"),  # nothing the stub could not be sent later
                (b'{"password": "\\ud800"}', "not a valid JSON"),
            ]
            for body, problem in bodies:
                status, answer = await call(session, "PUT", "/stubs/b.test/credentials", data=body)
                assert status == 400 and problem in answer["error"], answer
            status, answer = await call(session, "PUT", "/stubs/not a domain/credentials", json={})
            assert status == 400 and "domain" in answer["error"]
        assert runtime.identity.credentials_for("b.test") == {"password": "s3cret"}
