"""The runtime's metrics and health listener, scraped over HTTP during real deploys and traffic."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from protofly.message import Message, response_code
from protofly.observe.metrics import METRICS
from protofly.observe.server import ObserveServer


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(f"{url}/metrics") as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await answer.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not scraped"
    return samples[key]


async def test_metrics_move_with_deploys_and_traffic(domains, runtime_factory, backend) -> None:
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    async with runtime_factory() as runtime, aiohttp.ClientSession() as session:
        observe = ObserveServer(runtime, metrics="127.0.0.1:0")
        await observe.start()
        try:
            url = observe.urls["metrics"]
            before = await scrape(session, url)
            assert value(before, "protofly_runtime_stubs") == 0
            handle = await runtime.load_stub("b.test")
            stub = {"domain": "b.test", "stub_url": handle.record.url}
            deployed = await scrape(session, url)
            assert value(deployed, "protofly_runtime_stubs") == 1
            assert value(deployed, "protofly_stub_status", **stub, status="live") == 1
            assert value(deployed, "protofly_stub_status", **stub, status="deploying") == 0
            assert value(deployed, "protofly_stub_up", **stub) == 1
            assert value(deployed, "protofly_deploys_total", domain="b.test", outcome="live") == 1
            for step in handle.steps:  # one histogram series per seed step, each observed once
                labels = {"domain": "b.test", "step": step.name, "seed": step.seed}
                assert value(deployed, "protofly_deploy_step_seconds_count", **labels) == 1
                assert value(deployed, "protofly_deploy_step_seconds_sum", **labels) >= 0
            assert value(deployed, "protofly_deploy_seconds_count", domain="b.test") == 1
            assert value(deployed, "protofly_stub_memory_bytes", **stub) > 1 << 20  # a Python process
            assert value(deployed, "protofly_stub_processes", **stub) >= 1
            assert value(deployed, "protofly_stub_cpu_seconds_total", **stub) > 0
            sent_before = value(deployed, "protofly_stub_messages_in_total", **stub)
            bytes_before = value(deployed, "protofly_stub_bytes_in_total", **stub)
            for n in range(5):
                request = Message(id=n + 1, type="read", from_="hyperty://a.test/me", to="hyperty://b.test/x")
                assert response_code(await runtime.bus.request(request, timeout=5)) == 200
            traffic = await scrape(session, url)
            assert value(traffic, "protofly_stub_messages_in_total", **stub) == sent_before + 5
            assert value(traffic, "protofly_stub_messages_out_total", **stub) >= 5  # its answers
            assert value(traffic, "protofly_stub_bytes_in_total", **stub) > bytes_before
            assert value(traffic, "protofly_stub_dropped_total", **stub, reason="not_reading") == 0
            assert value(traffic, "protofly_stub_forged_total", **stub, kind="sender") == 0
            assert value(traffic, "protofly_stub_restarts_total", **stub) == 0
            backend.crash_all()  # the stub's back-end tells it to crash: a restart follows
            await runtime.registry.wait_for_status("b.test", ["failed"], 10)
            await runtime.registry.wait_for_status("b.test", ["live"], 10)
            restarted = await scrape(session, url)
            assert value(restarted, "protofly_stub_restarts_total", **stub) == 1
            assert value(restarted, "protofly_stub_crashes_total", domain="b.test") == 1
            scraped = {name for name, _ in restarted}
            for doc in METRICS:  # every documented series is exported
                expected = doc.name + ("_count" if doc.type == "histogram" else "")
                assert expected in scraped, expected
        finally:
            await observe.close()


async def test_readyz_turns_ready_when_the_home_stub_is_live(domains, runtime_factory, backend) -> None:
    domains.publish("a.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("a.test")
    async with runtime_factory() as runtime, aiohttp.ClientSession() as session:
        observe = ObserveServer(runtime, metrics="127.0.0.1:0")
        await observe.start()
        try:
            url = observe.urls["metrics"]
            async with session.get(f"{url}/healthz") as answer:
                assert answer.status == 200
                assert (await answer.json())["status"] == "alive"
            async with session.get(f"{url}/readyz") as answer:
                assert answer.status == 503
                body = await answer.json()
                assert body["ready"] is False
                assert body["checks"]["home_stub"] == {"ok": False, "domain": "a.test", "status": None}
            await runtime.load_stub("a.test")
            async with session.get(f"{url}/readyz") as answer:
                assert answer.status == 200
                body = await answer.json()
                assert body["checks"]["home_stub"]["status"] == "live"
                assert body["checks"]["sandbox"]["configured"] == "process"
                assert "process" in body["checks"]["sandbox"]["layers"]
            async with session.post(f"{url}/metrics") as answer:  # read-only
                assert answer.status == 405
        finally:
            await observe.close()


async def test_usage_comes_from_the_cgroup_and_from_proc_without_one(domains, runtime_factory, backend) -> None:
    """The metrics show the stub's cgroup accounting; with cgroups off, its process tree's from ``/proc``."""
    domains.publish("b.test", {"host": "127.0.0.1", "port": backend.port})
    await domains.serve("b.test")
    for cgroups in ("auto", "off"):
        async with runtime_factory(cgroups=cgroups) as runtime, aiohttp.ClientSession() as session:
            observe = ObserveServer(runtime, metrics="127.0.0.1:0")
            await observe.start()
            try:
                handle = await runtime.load_stub("b.test")
                stub = {"domain": "b.test", "stub_url": handle.record.url}
                samples = await scrape(session, observe.urls["metrics"])
                accounted = runtime.usage("b.test")
                has_cgroup = bool(handle.record.isolation.get("cgroup"))
                assert (accounted is not None) == has_cgroup
                if cgroups == "off":
                    assert accounted is None  # no cgroup: the figures below are the tree's, from /proc
                memory = value(samples, "protofly_stub_memory_bytes", **stub)
                assert memory > 1 << 20  # a Python process, whichever the source
                if accounted is not None:  # the same source: within what one scrape-to-read moment changes
                    assert abs(memory - accounted["memory_bytes"]) < 16 << 20
                assert value(samples, "protofly_stub_processes", **stub) >= 1
            finally:
                await observe.close()
