"""The runtime registry: identity that survives restarts, the stub table, status history and routing."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from pathlib import Path

import pytest

from protofly.bus import MessageBus
from protofly.message import Message, decode, response_code
from protofly.registry import (
    Local,
    NeedsStub,
    RegistryError,
    RuntimeRegistry,
    StatusTimeoutError,
    ToStub,
    Unroutable,
)


async def open_registry(state_dir: Path | None = None, domain: str = "a.test") -> tuple[MessageBus, RuntimeRegistry]:
    bus = MessageBus()
    registry = await RuntimeRegistry.open(bus, domain=domain, state_dir=state_dir)
    bus.set_resolver(registry.resolve)
    return bus, registry


def status_msg(url: str, value: str, **extra: str) -> Message:
    return Message(type="update", from_=url, to=f"{url}/status", body={"value": value, **extra})


async def test_runtime_url_survives_a_restart(state_dir: Path) -> None:
    _, first = await open_registry(state_dir)
    _, second = await open_registry(state_dir)
    assert first.runtime_url == second.runtime_url
    assert first.runtime_url.startswith("hyperty-runtime://a.test/")
    _, other = await open_registry(state_dir / "elsewhere")
    assert other.runtime_url != first.runtime_url


async def test_without_state_dir_each_runtime_is_new() -> None:
    _, first = await open_registry()
    _, second = await open_registry()
    assert first.runtime_url != second.runtime_url


async def test_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryError, match="state directory"):
        await open_registry(blocker)


async def test_stub_urls_are_never_reused_even_after_restart(state_dir: Path) -> None:
    _, first = await open_registry(state_dir)
    urls = {await first.allocate_url("protostub") for _ in range(100)}
    assert len(urls) == 100
    _, again = await open_registry(state_dir)
    after = {await again.allocate_url("protostub") for _ in range(10)}
    assert not urls & after
    assert all(u.startswith(first.runtime_url + "/protostub/") for u in urls | after)


async def test_register_records_deploying_and_refuses_duplicates() -> None:
    _, registry = await open_registry()
    record = registry.register_stub("b.test")
    assert record.status == "deploying"
    assert record.url.startswith(registry.runtime_url + "/protostub/")
    assert registry.stub("b.test") is record and registry.stub_by_url(record.url) is record
    with pytest.raises(RegistryError, match="already registered"):
        registry.register_stub("b.test")
    with pytest.raises(Exception, match="domain"):
        registry.register_stub("not a domain")


async def test_status_history_and_republication() -> None:
    bus, registry = await open_registry()
    republished: list[Message] = []
    bus.add_listener(registry.runtime_status_url, republished.append)
    record = registry.register_stub("b.test")
    registry.report(record, "deployed")
    for value in ["created", "in-progress", "live"]:
        bus.post(status_msg(record.url, value))
    bus.post(status_msg(record.url, "disconnected", desc="socket closed (1006)"))
    assert record.status == "disconnected"
    assert record.last_description() == "socket closed (1006)"
    assert [e.value for e in record.history] == [
        "deploying",
        "deployed",
        "created",
        "in-progress",
        "live",
        "disconnected",
    ]
    assert [e.source for e in record.history][-4:] == ["stub"] * 4
    times = [e.at for e in record.history]
    assert times == sorted(times)
    assert [m.body["value"] for m in republished] == [
        "deploying",
        "deployed",
        "created",
        "in-progress",
        "live",
        "disconnected",
    ]
    last = republished[-1]
    assert last.from_ == registry.runtime_url and last.to == registry.runtime_url + "/status"
    assert last.body["resource"] == record.url
    assert last.body["description"] == "socket closed (1006)"


async def test_seed_phase1_status_message_is_recorded_live() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    seed = (
        b'{"id": "1", "type": "UPDATE", "from": "'
        + record.url.encode()
        + b'", "resource": "'
        + record.url.encode()
        + b'/status", "body": {"value": "LIVE"}}'
    )
    bus.post(decode(seed))
    assert record.status == "live"


async def test_disallowed_transition_is_an_anomaly_not_applied() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    bus.post(status_msg(record.url, "live"))
    bus.post(status_msg(record.url, "created"))
    bus.post(status_msg(record.url, "sleepy"))
    assert record.status == "live"
    assert [(a.value, a.applied) for a in record.anomalies] == [("created", False), ("sleepy", False)]
    assert all(a.reason for a in record.anomalies)


async def test_status_from_another_sender_is_an_anomaly() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    bus.post(Message(type="update", from_="hyperty://evil.test/x", to=record.status_url, body={"value": "live"}))
    assert record.status == "deploying"
    assert record.anomalies and record.anomalies[0].source == "hyperty://evil.test/x"


async def test_wait_for_status() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    waiter = asyncio.create_task(registry.wait_for_status("b.test", ["LIVE"], timeout=1))
    await asyncio.sleep(0)
    bus.post(status_msg(record.url, "created"))
    assert not waiter.done()
    bus.post(status_msg(record.url, "connected"))
    assert (await asyncio.wait_for(waiter, 1)) is record
    assert await registry.wait_for_status(record.url, ["live"], timeout=0) is record
    with pytest.raises(StatusTimeoutError, match=r"did not reach disconnected .*status is live"):
        await registry.wait_for_status(record, ["disconnected"], timeout=0.02)
    assert record.waiting == 0


async def test_unregister_wakes_waiters_and_removes_listener() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    waiter = asyncio.create_task(registry.wait_for_status(record, ["live"], timeout=5))
    await asyncio.sleep(0)
    registry.unregister_stub("b.test")
    with pytest.raises(RegistryError, match="unregistered"):
        await asyncio.wait_for(waiter, 1)
    assert not bus.has_listener(record.status_url)
    assert registry.stub("b.test") is None
    with pytest.raises(RegistryError):
        registry.unregister_stub("b.test")


async def test_resolve_routes_to_the_stub_of_the_serving_domain() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    inbox: list[Message] = []
    bus.add_listener(record.url, inbox.append)
    for to in [
        "hyperty://b.test/1",
        "domain://msg-node.b.test/address-allocation",
        "domain://registry.b.test",
        "comm://b.test/room",
    ]:
        bus.post(Message(type="create", from_="hyperty://a.test/me", to=to))
    assert [m.to for m in inbox] == [
        "hyperty://b.test/1",
        "domain://msg-node.b.test/address-allocation",
        "domain://registry.b.test",
        "comm://b.test/room",
    ]


async def test_resolve_global_goes_home_and_local_space_is_404() -> None:
    bus, registry = await open_registry()
    home = registry.register_stub("a.test")
    inbox: list[Message] = []
    bus.add_listener(home.url, inbox.append)
    bus.post(Message(type="read", from_="hyperty://a.test/me", to="global://registry/"))
    assert len(inbox) == 1
    local = await bus.request(Message(type="read", from_="x:me", to=registry.runtime_url + "/nothing"), timeout=1)
    assert response_code(local) == 404
    garbage = await bus.request(Message(type="read", from_="x:me", to="not an address"), timeout=1)
    assert response_code(garbage) == 404
    session = await bus.request(Message(type="read", from_="x:me", to="mn:/session"), timeout=1)
    assert response_code(session) == 404


async def test_route_names_the_stub_a_domain_without_one_and_the_unroutable() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    to_b = Message(type="create", from_="hyperty://a.test/me", to="hyperty://b.test/1")
    assert registry.route(to_b) == ToStub("b.test", record.url)
    assert registry.route(Message(type="create", from_="hyperty://a.test/me", to="hyperty://c.test/1")) == (
        NeedsStub("c.test")
    )
    inside = f"{registry.runtime_url}/cli"
    assert registry.route(Message(type="read", from_="x:me", to=inside)) == Local(inside)
    registry.add_local("hyperty://a.test/me")
    assert registry.route(Message(type="read", from_="x:y", to="hyperty://a.test/me")) == Local("hyperty://a.test/me")
    assert isinstance(registry.route(Message(type="read", from_="x:y", to="nonsense")), Unroutable)
    await bus.close()


async def test_a_response_goes_back_through_the_stub_its_request_came_through() -> None:
    bus, registry = await open_registry()
    home = registry.register_stub("a.test")
    foreign = registry.register_stub("c.test")
    request = Message(id=7, type="execute", from_="hyperty://c.test/carol", to="hyperty://a.test/me")
    registry.remember_return(request, home.url)
    answer = Message(id=7, type="response", from_="hyperty://a.test/me", to="hyperty://c.test/carol")
    assert registry.route(answer) == ToStub("a.test", home.url)
    # the return path is used once; a second response with that id goes by the domain's own stub
    assert registry.route(answer) == ToStub("c.test", foreign.url)
    await bus.close()


async def test_summary_is_json_friendly() -> None:
    _, registry = await open_registry()
    record = registry.register_stub("b.test")
    summary = record.summary()
    assert summary["domain"] == "b.test" and summary["status"] == "deploying" and summary["restarts"] == 0


async def test_corrupt_state_file_is_a_clear_error(state_dir: Path) -> None:
    (state_dir / "runtime.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="cannot use state directory"):
        await open_registry(state_dir)
    # and a readable one still works afterwards
    (state_dir / "runtime.sqlite").unlink()
    await open_registry(state_dir)
    assert sqlite3.connect(state_dir / "runtime.sqlite").execute("SELECT count(*) FROM state").fetchone()[0] >= 1


async def test_many_synchronous_registrations_get_distinct_urls(state_dir: Path) -> None:
    for directory in (None, state_dir):
        _, registry = await open_registry(directory)
        urls = set()
        for i in range(30):
            urls.add(registry.register_stub(f"d{i}.test").url)
            await asyncio.sleep(0)  # let background top-ups run, as the event loop does between messages
        more = {(await registry.allocate_url("protostub")) for _ in range(200)}
        assert len(urls) == 30 and len(more) == 200 and not urls & more
        await registry.close()


async def test_a_repeated_live_refreshes_its_time_and_expired_is_the_runtimes_to_say() -> None:
    bus, registry = await open_registry()
    record = registry.register_stub("b.test")
    assert record.live_at is None
    bus.post(status_msg(record.url, "live"))
    first = record.live_at
    assert first is not None and record.live_after_error is False
    bus.post(status_msg(record.url, "live"))  # repeated: not a change, but a refresh
    assert record.live_at is not None and record.live_at >= first
    assert record.anomalies == deque() and len(record.history) == 2  # deploying, live
    bus.post(status_msg(record.url, "expired"))  # a stub may not expire itself
    assert record.status == "live"
    assert record.anomalies[-1].reason == "expired is the runtime's to report"
    bus.post(status_msg(record.url, "failed"))
    bus.post(status_msg(record.url, "in-progress"))
    bus.post(status_msg(record.url, "live"))
    assert record.live_after_error is False  # in-progress came between
    bus.post(status_msg(record.url, "disconnected"))
    bus.post(status_msg(record.url, "live"))
    assert record.live_after_error is True  # straight after an error: the shorter time to live
    bus.post(status_msg(record.url, "live"))
    assert record.live_after_error is False  # refreshed
