"""The deploy-protocol-stub flow (seed steps 1-12) against real servers, real processes and signed stubs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest
from tests.processes import alive, descendants

from protofly.events import CrashLoop, DeployStep, StubLive
from protofly.message import Message, response_code
from protofly.runtime import StubDeploymentError

SECRET = "tok-5f2c9e1d-do-not-log"


def ask(to: str, n: int = 0, sender: str = "hyperty://a.test/me") -> Message:
    return Message(type="create", from_=sender, to=to, body={"n": n})


async def test_explicit_load_goes_live_with_a_timeline(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory() as runtime:
        observed: list = []
        runtime.events.subscribe(observed.append)
        started = time.perf_counter()
        handle = await runtime.load_stub("b.test")
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert handle.status == "live"
        assert handle.url.startswith(runtime.runtime_url + "/protostub/")
        # The seed's steps, in the seed's order, each with the seed step numbers it implements.
        assert [(s.name, s.seed) for s in handle.steps] == [
            ("registry", "1-2, 6, 8"),
            ("catalogue", "3-4"),
            ("sandbox", "5, 7, 9"),
            ("connect", "10"),
            ("live", "11-12"),
        ]
        # Each step took time, and the steps are back to back inside the call: their sum is the total, and
        # the total fits in the time load_stub took.
        assert all(s.ms > 0 for s in handle.steps)
        assert handle.total_ms == pytest.approx(sum(s.ms for s in handle.steps))
        assert 0 < handle.total_ms <= elapsed_ms
        assert handle.steps[1].detail.startswith("default ") and "1.0.0" in handle.steps[1].detail
        # The sandbox step says where its time went: waiting for a host, the stub's cgroup limits, the
        # host's confinement and the stub's code start (as the host timed them), the channel's round trip.
        sandbox = handle.steps[2]
        assert set(sandbox.parts) == {"host", "limits", "confine", "load", "channel"}
        assert sandbox.parts["load"] > 0 and sandbox.parts["confine"] > 0
        assert all(ms >= 0 for ms in sandbox.parts.values())
        assert sum(sandbox.parts.values()) <= sandbox.ms + 0.01  # parts of the step, rounded to the µs
        assert [s.name for s in handle.steps if s.parts] == ["sandbox"]
        # Observers saw the same timeline, then 'live' with the same total.
        steps_seen = [(e.step, e.seed, e.ms) for e in observed if isinstance(e, DeployStep)]
        assert steps_seen == [(s.name, s.seed, round(s.ms, 3)) for s in handle.steps]
        [live] = [e for e in observed if isinstance(e, StubLive)]
        assert live.total_ms == round(handle.total_ms, 3) and live.stub_url == handle.url
        assert handle.version == "1.0.0" and handle.signer
        assert handle.isolation.get("process") is True
        values = [e.value for e in handle.record.history]
        assert values[0] == "deploying" and values[-1] == "live"
        assert "deployed" in values and "created" in values
        assert runtime.registry.stub("b.test") is handle.record
        again = await runtime.load_stub("b.test")
        assert again is handle
        await backend.wait_hellos(1)
        assert len(backend.hellos) == 1


async def test_message_to_unknown_domain_deploys_and_is_delivered(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory() as runtime:
        assert runtime.registry.stub("b.test") is None
        answer = await runtime.bus.request(ask("hyperty://b.test/someone", 7), timeout=15)
        assert response_code(answer) == 200
        assert answer.body["value"] == {"n": 7}
        assert answer.body["via"] == runtime.registry.stub("b.test").url
        assert runtime.registry.stub("b.test").status == "live"


async def test_concurrent_loads_and_messages_share_one_deployment(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    server = await domains.serve("b.test")
    async with runtime_factory() as runtime:
        loads = [runtime.load_stub("b.test") for _ in range(50)]
        requests = [
            runtime.bus.request(ask(f"hyperty://b.test/{i}", i, f"hyperty://a.test/s{i}"), timeout=15)
            for i in range(50)
        ]
        results = await asyncio.gather(*loads, *requests)
        handles, answers = results[:50], results[50:]
        assert len({id(h) for h in handles}) == 1
        assert [a.body["value"]["n"] for a in answers] == list(range(50))
        assert all(response_code(a) == 200 for a in answers)
        descriptor_downloads = sum(
            n for path, n in server.requests.items() if path.endswith("/default") or path.endswith("default.ps.json")
        )
        assert descriptor_downloads == 1
        await backend.wait_hellos(1)
        assert len(backend.hellos) == 1
        assert len(runtime.stubs()) == 1


async def test_queued_messages_are_delivered_in_order(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory() as runtime:
        for i in range(20):
            runtime.bus.post(ask("hyperty://b.test/x", i))
        await runtime.load_stub("b.test")
        await backend.wait_received(20)
        assert [m["body"]["n"] for m in backend.received] == list(range(20))


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("catalogue-down", 503, "E_FETCH"),
        ("digest", 503, "E_DIGEST"),
        ("raise-in-activate", 503, "refusing to start in test mode"),
        ("never-live", 504, "did not go live"),
    ],
)
async def test_failed_deployments_answer_every_waiting_sender(
    backend, domains, runtime_factory, case, code, words
) -> None:
    mode = {"raise-in-activate": "raise-in-activate", "never-live": "never-live"}.get(case, "normal")
    published = domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port, "mode": mode})
    server = await domains.serve("b.test")
    if case == "digest":
        source = published.with_name("default.ps.py")
        source.write_bytes(source.read_bytes() + b"\n# tampered\n")
        await domains.reload("b.test")
    overrides = {"deploy_timeout": 1.5} if case == "never-live" else {}
    if case == "catalogue-down":
        await server.stop()
    async with runtime_factory(**overrides) as runtime:
        answers = await asyncio.gather(
            *(runtime.bus.request(ask(f"hyperty://b.test/{i}", i), timeout=15) for i in range(5))
        )
        assert [response_code(a) for a in answers] == [code] * 5
        assert all(words in a.body["description"] for a in answers)
        record = runtime.registry.stub("b.test")
        assert record.status == "deployment-failed"
        assert words in record.last_description()
        with pytest.raises(StubDeploymentError) as caught:
            await runtime.load_stub("b.test")
        assert caught.value.code in (503, 504)
        assert backend.received == []


async def test_full_queue_answers_503_at_once(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port, "mode": "never-live"})
    await domains.serve("b.test")
    async with runtime_factory(queue_limit=3, deploy_timeout=30) as runtime:
        waiting = [asyncio.create_task(runtime.bus.request(ask("hyperty://b.test/x", i), timeout=60)) for i in range(3)]
        await asyncio.sleep(0)
        refused = await runtime.bus.request(ask("hyperty://b.test/x", 99), timeout=1)
        assert response_code(refused) == 503 and "queue is full" in refused.body["description"]
        await runtime.unload_stub("b.test")
        results = await asyncio.gather(*waiting)
        assert [response_code(r) for r in results] == [503, 503, 503]


async def test_crash_after_live_restarts_and_delivers_queued(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory(backoff_base=0.2, backoff_cap=0.2) as runtime:
        handle = await runtime.load_stub("b.test")
        first_pid = handle.record.info["pid"]
        backend.crash_all()
        await runtime.registry.wait_for_status("b.test", ["failed"], timeout=5)
        assert "exit code 3" in handle.record.last_description()
        queued = [asyncio.create_task(runtime.bus.request(ask("hyperty://b.test/q", i), timeout=15)) for i in range(5)]
        answers = await asyncio.gather(*queued)
        assert [a.body["value"]["n"] for a in answers] == list(range(5))
        assert handle.record.status == "live"
        assert handle.record.restarts == 1
        assert handle.record.info["pid"] != first_pid
        assert not alive(first_pid)


async def test_crash_loop_gives_up_then_retry_now_recovers(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory(crash_budget=3, crash_window=60) as runtime:
        gave_up = asyncio.Event()
        runtime.events.subscribe(lambda event: gave_up.set() if isinstance(event, CrashLoop) else None)
        await runtime.load_stub("b.test")
        backend.crash_on_hello = True
        backend.crash_all()
        await asyncio.wait_for(gave_up.wait(), 20)
        record = runtime.registry.stub("b.test")
        assert record.status in ("failed", "deployment-failed")
        refused = await runtime.bus.request(ask("hyperty://b.test/x"), timeout=2)
        assert response_code(refused) == 503 and "retry_now" in refused.body["description"]
        backend.crash_on_hello = False
        handle = await runtime.retry_now("b.test")
        assert handle.status == "live"
        answer = await runtime.bus.request(ask("hyperty://b.test/x", 1), timeout=5)
        assert response_code(answer) == 200


async def test_credentials_reach_the_stub_and_no_log_line(
    backend, domains, runtime_factory, tmp_path: Path, caplog
) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"b.test": {"token": SECRET}}))
    caplog.set_level(logging.DEBUG)
    async with runtime_factory(credentials_file=credentials) as runtime:
        handle = await runtime.load_stub("b.test")
        backend.crash_all()
        await runtime.registry.wait_for_status("b.test", ["live"], timeout=10)
        await backend.wait_hellos(2)
        history = repr(handle.record.history) + repr(handle.record.summary())
    assert backend.hellos[0]["credentials"] == {"token": SECRET}
    assert backend.hellos[1]["credentials"] == {"token": SECRET}
    assert caplog.records, "the runtime logged nothing at all: the check below would prove nothing"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(vars(record))
    assert SECRET not in history


async def test_unload_and_shutdown_leave_no_process(backend, domains, runtime_factory) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    domains.publish("c.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    await domains.serve("c.test")
    async with runtime_factory() as runtime:
        b = await runtime.load_stub("b.test")
        c = await runtime.load_stub("c.test")
        pids = [b.record.info["pid"], c.record.info["pid"]]
        assert all(alive(p) for p in pids)
        record = await runtime.unload_stub("b.test")
        assert not alive(pids[0])
        assert runtime.registry.stub("b.test") is None
        assert not runtime.bus.has_listener(record.url)
        with pytest.raises(StubDeploymentError):
            await runtime.unload_stub("b.test")
        again = await runtime.bus.request(ask("hyperty://b.test/x", 5), timeout=15)
        assert response_code(again) == 200
        new_url = runtime.registry.stub("b.test").url
        assert new_url != record.url
        pids.append(runtime.registry.stub("b.test").info["pid"])
    assert not any(alive(p) for p in pids)
    assert not descendants(os.getpid()) & set(pids)


async def test_a_stub_that_stops_reading_gets_its_senders_answered(domains, runtime_factory, make_inbox) -> None:
    domains.publish("b.test", {}, stub="blocker")
    await domains.serve("b.test")
    async with runtime_factory() as runtime:
        handle = await runtime.load_stub("b.test")
        inbox = make_inbox()
        runtime.bus.add_listener("hyperty://a.test/me", inbox)
        payload = "x" * 65536
        for i in range(400):  # 26 MB: more than the channel holds for a stub that does not read
            runtime.bus.post(
                Message(
                    id=i + 1, type="update", from_="hyperty://a.test/me", to="hyperty://b.test/x", body={"pad": payload}
                )
            )
        await inbox.wait_for(1, timeout=5)
        assert all(response_code(m) == 503 for m in inbox.items)
        assert "not taking messages" in inbox.items[0].body["description"]
        assert handle.record.counters["dropped_to_stub"] == len(inbox.items)


async def test_resolver_only_never_looks_beyond_the_configured_catalogues(domains, runtime_factory) -> None:
    async with runtime_factory() as runtime:  # resolver_only=True: z.test has no catalogue in the map
        answer = await runtime.bus.request(ask("hyperty://z.test/x"), timeout=15)
        assert response_code(answer) == 503
        assert answer.body["description"].startswith("E_FETCH")
        assert "not in the resolver map (resolver_only)" in answer.body["description"]
        assert "DNS" not in answer.body["description"]
        assert runtime.registry.stub("z.test").status == "deployment-failed"


async def test_a_runtime_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    from protofly import Runtime, RuntimeConfig
    from protofly.catalogue import KeyFileError
    from protofly.identity import IdentityError

    bad_trust = RuntimeConfig(domain="a.test", trust_store=tmp_path / "missing-trust.json")
    with pytest.raises(KeyFileError, match="missing-trust.json"):
        async with Runtime(bad_trust):
            pass
    (tmp_path / "creds.json").write_text("{not json")
    bad_credentials = RuntimeConfig(domain="a.test", credentials_file=tmp_path / "creds.json")
    runtime = Runtime(bad_credentials)
    with pytest.raises(IdentityError, match="creds.json"):
        await runtime.__aenter__()
    from protofly.bus import BusClosedError

    with pytest.raises(BusClosedError):
        runtime.bus.post(ask("hyperty://b.test/x"))


async def test_bad_references_and_a_missing_home_node_are_clear_errors(runtime_factory) -> None:
    from protofly.address import AddressError
    from protofly.hyperty import HypertyError

    async with runtime_factory(deploy_timeout=3) as runtime:
        for garbage in ("not a domain", "https://b.test/somewhere/else", ""):
            with pytest.raises(AddressError):
                await runtime.load_stub(garbage)
        with pytest.raises(StubDeploymentError) as caught:
            await runtime.unload_stub("never-loaded.test")
        assert caught.value.code == 404
        with pytest.raises(HypertyError, match="allocation .* failed: 503 E_FETCH"):
            await runtime.new_hyperty()  # a.test has no catalogue here, so no home stub can be deployed
