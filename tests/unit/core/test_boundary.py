"""The runtime's side of the trust boundary, with a real bus and registry and no processes."""

from __future__ import annotations

import asyncio

from protofly.admission import DeployAdmission
from protofly.boundary import BoundaryPolicy, StubBoundary
from protofly.bus import NOT_PENDING, REFUSED, SETTLED, MessageBus
from protofly.log import get_logger
from protofly.message import Message, response, response_code
from protofly.registry import RuntimeRegistry, ToStub
from protofly.throttle import LogThrottle, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def setting(**policy: float):
    bus = MessageBus()
    registry = await RuntimeRegistry.open(bus, domain="a.test")
    bus.set_resolver(registry.resolve)
    home = registry.register_stub("a.test")
    foreign = registry.register_stub("b.test")
    clock = Clock()
    warnings = LogThrottle(get_logger("test"), clock=clock)
    make = lambda record: StubBoundary(  # noqa: E731
        record, bus=bus, registry=registry, policy=BoundaryPolicy(**policy), warnings=warnings, clock=clock
    )
    return bus, registry, make(home), make(foreign), clock


async def test_a_forged_response_settles_nothing_and_is_counted() -> None:
    bus, registry, home, foreign, _ = await setting()
    bus.add_listener(home.url, lambda msg: None)  # the home stub's port: where the runtime's request goes
    bus.add_listener(foreign.url, lambda msg: None)
    request = Message(
        type="create",
        from_=f"{registry.runtime_url}/address-allocation",
        to="domain://msg-node.a.test/address-allocation",
    )
    waiting = asyncio.ensure_future(bus.request(request, timeout=0.2))
    await asyncio.sleep(0)  # the request is posted and routed to the home stub
    forged = response(request, 200, value={"allocated": ["hyperty://a.test/someone-else"]})
    assert foreign.admit(forged) is False  # came through the wrong stub
    assert foreign.record.counters["forged_responses"] == 1
    wrong_sender = Message(
        id=request.id, type="response", from_="hyperty://a.test/x", to=request.from_, body={"code": 200}
    )
    assert bus.settle_from(wrong_sender, home.url) == REFUSED  # right stub, but not from where it was sent
    real = response(request, 200, value={"allocated": ["hyperty://a.test/mine"]})
    assert bus.settle_from(real, home.url) == SETTLED
    answer = await waiting
    assert answer.body["value"] == {"allocated": ["hyperty://a.test/mine"]}
    assert bus.settle_from(real, home.url) == NOT_PENDING
    await bus.close()


async def test_a_stub_may_reach_hyperties_and_its_status_not_the_runtime_other_stubs_or_other_domains() -> None:
    bus, registry, _, foreign, _ = await setting()
    bus.add_listener("hyperty://a.test/alice", lambda msg: None)
    registry.add_local("hyperty://a.test/alice")
    sender = "hyperty://b.test/bob"
    allowed = [Message(type="update", from_=foreign.url, to=f"{foreign.url}/status", body={"value": "live"}),
               Message(type="execute", from_=sender, to="hyperty://a.test/alice")]  # fmt: skip
    for msg in allowed:
        assert foreign.admit(msg), msg.to
    assert allowed[1].body == {"via": foreign.url}  # the runtime says which stub it came through
    refused = [
        registry.runtime_status_url,
        f"{registry.runtime_url}/protostub/1",
        f"{registry.runtime_url}/protostub/1/status",
        "hyperty-runtime://sandbox/external",
        "hyperty://c.test/carol",  # another domain: no relaying (and no deployment)
    ]
    for to in refused:
        assert not foreign.admit(Message(type="update", from_=sender, to=to)), to
    assert foreign.record.counters["forbidden_destination"] == len(refused)
    assert registry.stub("c.test") is None
    await bus.close()


async def test_floods_are_cut_by_the_buckets_and_counted_and_requests_get_429() -> None:
    bus, _, _, foreign, clock = await setting(status_rate=10, status_burst=5, message_rate=100, message_burst=3)
    bus.add_listener("hyperty://a.test/alice", lambda msg: None)
    answers: list[Message] = []
    bus.add_listener("hyperty://b.test/bob", answers.append)  # stands for the stub's sender, to see the 429
    status = Message(type="update", from_=foreign.url, to=f"{foreign.url}/status", body={"value": "live"})
    assert sum(foreign.admit(status) for _ in range(20)) == 5
    assert foreign.record.counters["status_rate_limited"] == 15
    clock.now += 0.5  # five more tokens
    assert sum(foreign.admit(status) for _ in range(20)) == 5
    sent = [Message(id=n, type="execute", from_="hyperty://b.test/bob", to="hyperty://a.test/alice") for n in range(10)]
    assert sum(foreign.admit(msg) for msg in sent) == 3
    assert foreign.record.counters["messages_rate_limited"] == 7
    assert [response_code(a) for a in answers] == [429] * 7
    await bus.close()


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 4, clock=clock)
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]
    clock.now += 1.0
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 100.0
    assert sum(bucket.take() for _ in range(10)) == 4


def test_a_log_throttle_writes_one_line_per_key_and_interval_and_says_how_many_it_held(caplog) -> None:
    clock = Clock()
    throttle = LogThrottle(get_logger("protofly.test"), 10.0, clock=clock)
    with caplog.at_level("WARNING", logger="protofly.test"):
        written = [throttle.warning(("s", "kind"), "flood", n=n) for n in range(1000)]
        throttle.warning(("s", "other"), "flood")
        clock.now += 10.0
        throttle.warning(("s", "kind"), "flood")
    assert sum(written) == 1 and len(caplog.records) == 3
    assert caplog.records[-1].suppressed == 999


def test_admission_bounds_deploys_and_answers_evicted_failures_from_the_negative_cache() -> None:
    clock = Clock()
    admission = DeployAdmission(max_stubs=2, max_deploying=1, negative_ttl=30.0, clock=clock)
    assert admission.check("b.test", stubs=0, deploying=0, evictable=False) is None
    refusal = admission.check("c.test", stubs=1, deploying=1, evictable=False)
    assert refusal is not None and refusal.code == 503 and "max_concurrent_deploys" in refusal.description
    assert admission.check("c.test", stubs=2, deploying=0, evictable=False) is not None
    assert admission.check("c.test", stubs=2, deploying=0, evictable=True) is None
    admission.remember_failure("d.test", 503, "catalogue unreachable")
    cached = admission.check("d.test", stubs=0, deploying=0, evictable=False)
    assert cached is not None and cached.description == "catalogue unreachable"
    clock.now += 31
    assert admission.check("d.test", stubs=0, deploying=0, evictable=False) is None
    assert admission.counters == {"deploys_refused": 2, "negative_cache_hits": 1}


async def test_a_refused_response_does_not_use_up_anothers_return_path() -> None:
    bus, registry, home, foreign, _ = await setting()
    request = Message(id=7, type="execute", from_="hyperty://c.test/carol", to="hyperty://a.test/me")
    registry.remember_return(request, home.url)  # carol's request came in through the home stub
    forged = Message(id=7, type="response", from_="hyperty://b.test/x", to="hyperty://c.test/carol", body={})
    assert not foreign.admit(forged)
    assert foreign.record.counters["forbidden_destination"] == 1
    answer = Message(id=7, type="response", from_="hyperty://a.test/me", to="hyperty://c.test/carol")
    assert registry.route(answer) == ToStub("a.test", home.url)  # the real answer still goes back that way
    await bus.close()
