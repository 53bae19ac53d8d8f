"""reTHINK's JavaScript stubs deployed by a runtime from a catalogue, in Node sandbox hosts.

Interop: runtime A reaches domain x.test through reTHINK's own Vert.x stub (unmodified, in Node), runtime B
through protofly's Python stub, both against one ``protofly msg-node``; a request from a hyperty in A to a
hyperty in B and the reply cross both stubs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest

from protofly.events import StubCrashed
from protofly.message import Message, response_code

from .conftest import DATA, STUBS, JsWorld, rethink_descriptor


def connection_values(record) -> list[str]:
    return [e.value for e in record.history if e.group == "connection"]


async def test_rethinks_vertx_stub_goes_live_in_node_and_carries_a_request_to_a_python_stub_and_back(
    world: JsWorld,
) -> None:
    await world.publish_rethink("cat-js", "x.test")
    await world.publish_msgnode("cat-py", "x.test")
    js, py = await world.serve("cat-js"), await world.serve("cat-py")
    async with world.runtime("x.test", {"x.test": js}) as rt_a, world.runtime("x.test", {"x.test": py}) as rt_b:
        hyperty_b = await rt_b.new_hyperty(lambda msg: {"echo": msg.body["n"], "from": msg.from_})
        hyperty_a = await rt_a.new_hyperty()  # allocated by the node through reTHINK's stub

        stub_a, stub_b = rt_a.registry.stub("x.test"), rt_b.registry.stub("x.test")
        assert stub_a.status == "live" and stub_a.isolation["host"] == "node"
        assert stub_b.status == "live" and stub_b.isolation["host"] == "python"
        assert connection_values(stub_a) == ["created", "in-progress", "live"]
        layers = stub_a.isolation
        assert layers["bwrap"] and layers["seccomp"] and layers["landlock"] and layers["no_new_privs"]
        assert layers["rlimits"]["memory_mb"] == 1024 and "RLIMIT_DATA" in layers["rlimits"]["memory"]
        # Both stubs sit in an empty network namespace; each reached its node through the runtime's broker.
        node_url = (await world.node("x.test")).url
        for record in (stub_a, stub_b):
            assert record.isolation["network"] == {"namespace": "own, no interface but loopback", "egress": [node_url]}
            assert "net" in record.isolation["bwrap"]["namespaces"]
            assert not any(item.startswith("network namespace") for item in record.isolation["missing"])
            assert record.counters["egress_opened"] == 1 and record.counters.get("egress_refused", 0) == 0

        answer = await hyperty_a.request(hyperty_b.url, "execute", {"n": 7}, timeout=20)
        assert response_code(answer) == 200
        assert answer.body["value"] == {"echo": 7, "from": hyperty_a.url}

        answers = await asyncio.gather(
            *(hyperty_a.request(hyperty_b.url, "execute", {"n": n}, timeout=20) for n in range(50))
        )
        assert [a.body["value"]["echo"] for a in answers] == list(range(50))
        assert stub_a.counters["forged_from"] == 0 and stub_a.counters["messages_from_stub"] >= 53


async def test_disconnect_of_rethinks_stub_reports_disconnected(world: JsWorld) -> None:
    await world.publish_rethink("cat-js", "x.test")
    js = await world.serve("cat-js")
    async with world.runtime("y.test", {"x.test": js}) as runtime:
        handle = await runtime.load_stub("x.test")
        assert world.nodes["x.test"].counters["sessions"] == 1
        record = await runtime.unload_stub("x.test")
        assert connection_values(record)[-1] == "disconnected"
        assert handle.record is record


async def test_rethinks_unsigned_static_layout_deploys_under_warn_loudly_and_is_refused_under_require(
    world: JsWorld, caplog: pytest.LogCaptureFixture
) -> None:
    node = await world.node("x.test")
    folder = world.root / "cat-raw" / ".well-known" / "protocolstub"
    folder.mkdir(parents=True)
    descriptor = rethink_descriptor(node.url, egress=[node.url])  # no sourcePackage, no signature
    (folder / "default.ps.json").write_text(json.dumps(descriptor))
    (folder / "default.ps.js").write_bytes((DATA / "default.ps.js").read_bytes())
    raw = await world.serve("cat-raw")
    async with world.runtime("y.test", {"x.test": raw}, policy="require") as runtime:
        answer = await runtime.bus.request(
            Message(type="update", from_="hyperty://y.test/me", to="hyperty://x.test/you", body={}), timeout=15
        )
        assert response_code(answer) == 503 and "unsigned" in answer.body["description"]
    caplog.set_level(logging.WARNING, logger="protofly")
    async with world.runtime("y.test", {"x.test": raw}, policy="warn") as runtime:
        handle = await runtime.load_stub("x.test")
        assert handle.status == "live" and handle.signer is None
        assert handle.isolation["host"] == "node"
    loud = [r for r in caplog.records if r.getMessage().startswith("UNSIGNED stub 'default' for x.test accepted")]
    assert [r.levelno for r in loud] == [logging.WARNING]


async def test_rethinks_gen1_vertx_package_with_latin1_bytes_deploys_and_goes_live(world: JsWorld) -> None:
    package = json.loads((DATA / "VertxProtoStub.description.json").read_text())
    source = base64.b64decode(package["sourcePackage"]["sourceCode"])
    with pytest.raises(UnicodeDecodeError):
        source.decode("utf-8")
    world.root.mkdir(parents=True, exist_ok=True)
    stub = world.root / "VertxProtoStub.js"
    stub.write_bytes(source)
    node = await world.node("x.test")
    world.publish_js(
        "cat-gen1", "x.test", stub, {"url": node.url}, sourceCodeClassname="VertxProtoStub", egress=[node.url]
    )
    cat = await world.serve("cat-gen1")
    async with world.runtime("y.test", {"x.test": cat}) as runtime:
        handle = await runtime.load_stub("x.test")
        assert handle.status == "live" and handle.isolation["host"] == "node"
        assert world.nodes["x.test"].counters["sessions"] == 1


async def test_a_stub_needing_createsyncher_fails_its_deploy_naming_the_missing_service(world: JsWorld) -> None:
    world.publish_js("cat", "iw.test", STUBS / "syncher.ps.js", {})
    cat = await world.serve("cat")
    async with world.runtime("y.test", {"iw.test": cat}) as runtime:
        answer = await runtime.bus.request(
            Message(type="update", from_="hyperty://y.test/me", to="hyperty://iw.test/you", body={}), timeout=15
        )
        assert response_code(answer) == 503
        description = answer.body["description"]
        assert "MissingCapability: factory.createSyncher is not available in protofly's Node sandbox" in description
        assert runtime.registry.stub("iw.test").status == "deployment-failed"


async def test_without_node_a_javascript_stub_is_a_missing_capability_with_the_install_hint(
    world: JsWorld, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    await world.publish_rethink("cat-js", "x.test")
    js = await world.serve("cat-js")
    monkeypatch.setenv("PATH", str(tmp_path))  # no node on this runtime's PATH
    async with world.runtime("y.test", {"x.test": js}) as runtime:
        answer = await runtime.bus.request(
            Message(type="update", from_="hyperty://y.test/me", to="hyperty://x.test/you", body={}), timeout=15
        )
    assert response_code(answer) == 501
    assert answer.body["description"].startswith("missing capability: Node.js is not installed")
    assert "apt-get install nodejs" in answer.body["description"]


# -- containment: a hostile JavaScript stub, signed, served, deployed through the runtime ----------------


async def crash_of(world: JsWorld, mode: str, sandbox: dict[str, int] | None = None) -> tuple[StubCrashed, str | None]:
    """The first crash of a hostile stub, and its record's last description at that crash (the restart that
    follows may go live before the runtime closes, and a ``live`` status has no description)."""
    extra = {"sandbox": sandbox} if sandbox else {}
    world.publish_js("cat", "bad.test", STUBS / "hostile.js", {"mode": mode}, **extra)
    cat = await world.serve("cat")
    crashes: list[StubCrashed] = []
    described: list[str | None] = []
    crashed = asyncio.Event()

    def observe(event: object) -> None:
        if isinstance(event, StubCrashed):
            crashes.append(event)
            described.append(runtime.registry.stub("bad.test").last_description())
            crashed.set()

    async with world.runtime("y.test", {"bad.test": cat}, crash_budget=3) as runtime:
        runtime.events.subscribe(observe)
        handle = await runtime.load_stub("bad.test")
        assert handle.isolation["host"] == "node"
        runtime.bus.post(Message(type="update", from_="hyperty://y.test/me", to="hyperty://bad.test/you", body={}))
        await asyncio.wait_for(crashed.wait(), 30)
        record = runtime.registry.stub("bad.test")
        assert record.history[-1].value == "failed" or "failed" in connection_values(record)
        return crashes[0], described[0]


async def test_a_js_stub_that_crashes_is_reported_failed_and_restarted(
    world: JsWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="protofly")
    crash, described = await crash_of(world, "crash")
    assert crash.reason == "uncaught exception in the stub (exit code 70)"  # the runtime's words, from the exit
    assert crash.restart_in_s >= 0
    assert described == "uncaught exception in the stub (exit code 70)"
    said = [getattr(r, "said", None) for r in caplog.records if r.getMessage().startswith("the sandbox host's last")]
    assert said == ["uncaught Error: stub crashed on purpose"]  # the host's own words, logged


async def test_a_js_stub_that_loops_forever_is_stopped_by_the_cpu_limit(world: JsWorld) -> None:
    crash, _ = await crash_of(world, "loop", {"cpuSeconds": 1})
    assert crash.reason == "CPU limit exceeded (SIGXCPU)"


async def test_a_js_stub_that_allocates_without_bound_is_stopped_by_the_memory_limit(world: JsWorld) -> None:
    crash, _ = await crash_of(world, "allocate", {"memoryMB": 96})
    assert crash.reason.startswith("memory limit")


async def test_a_js_stub_that_escapes_its_vm_context_is_still_held_by_the_process_sandbox(
    world: JsWorld, tmp_path
) -> None:
    secret = tmp_path / "runtime-secrets"
    secret.mkdir()
    forged = "hyperty://y.test/someone-local"
    world.publish_js("cat", "bad.test", STUBS / "escaper.js", {"secretDir": str(secret), "forged": forged})
    cat = await world.serve("cat")
    async with world.runtime("y.test", {"bad.test": cat}) as runtime:
        answer = await runtime.bus.request(
            Message(type="read", from_="hyperty://y.test/me", to="hyperty://bad.test/you", body={}), timeout=15
        )
        assert response_code(answer) == 200, answer.body
        outcome = dict(answer.body["value"])
        record = runtime.registry.stub("bad.test")
        assert record.isolation["landlock"] and record.isolation["seccomp"] and record.isolation["bwrap"]
        forged_from = record.counters["forged_from"]
    assert outcome == {
        "read /etc/shadow": "ENOENT",  # not in the sandbox's file system
        "read the checkout": "ENOENT",
        "write /usr": "EROFS",
        "listen on TCP": "EACCES",  # Landlock: no TCP bind
    }
    assert forged_from >= 1  # the forged update was dropped at the boundary and counted
