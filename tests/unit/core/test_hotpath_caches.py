"""The per-message checks decided once per sender, destination or route: the answers kept must never go stale.

The guard keeps the senders a stub may use, the boundary the destinations it may reach, the registry the
stub each destination routes to.  Each test changes the table the kept answer came from (a local
component, a listener, a stub) and asserts that the next message is judged by the new table.
"""

from __future__ import annotations

from collections import deque

from protofly.boundary import BoundaryPolicy, StubBoundary
from protofly.bus import MessageBus
from protofly.log import get_logger
from protofly.message import Message
from protofly.registry import MAX_RETURN_PATHS, NeedsStub, RuntimeRegistry, ToStub
from protofly.sandbox import Boundary, Component
from protofly.sandbox.guard import MAX_CLEARED, Guard
from protofly.session_store import SessionStore
from protofly.throttle import LogThrottle


async def _registry(domain: str = "a.test") -> tuple[MessageBus, RuntimeRegistry]:
    bus = MessageBus()
    registry = await RuntimeRegistry.open(bus, domain=domain)
    bus.set_resolver(registry.resolve)
    return bus, registry


def _guard(registry: RuntimeRegistry, stub_domain: str, received: list[Message]) -> Guard:
    boundary = Boundary(
        runtime_url=registry.runtime_url,
        runtime_domain=registry.domain,
        stub_domain=stub_domain,
        is_local=registry.is_local_component,
        local_version=registry.local_generation,
    )
    return Guard(f"{registry.runtime_url}/protostub/1", boundary, received.append)


async def test_a_sender_cleared_before_it_became_a_local_component_is_refused_after() -> None:
    bus, registry = await _registry()
    received: list[Message] = []
    guard = _guard(registry, "a.test", received)  # the home stub: may relay other domains' senders
    future_hyperty = "hyperty://c.test/carol"
    guard.from_stub(Message(type="update", from_=future_hyperty, to="hyperty://a.test/alice"))
    guard.from_stub(Message(type="update", from_=future_hyperty, to="hyperty://a.test/alice"))
    assert len(received) == 2
    registry.add_local(future_hyperty)  # the address is now a component of this runtime
    guard.from_stub(Message(type="update", from_=future_hyperty, to="hyperty://a.test/alice"))
    assert len(received) == 2
    assert guard.counters["forged_from"] == 1
    registry.remove_local(future_hyperty)  # and gone again: the stub may relay it once more
    guard.from_stub(Message(type="update", from_=future_hyperty, to="hyperty://a.test/alice"))
    assert len(received) == 3
    await bus.close()


async def test_a_forged_sender_is_refused_and_counted_every_time() -> None:
    bus, registry = await _registry()
    received: list[Message] = []
    guard = _guard(registry, "b.test", received)
    for _ in range(5):
        guard.from_stub(Message(type="update", from_="hyperty://a.test/x", to="hyperty://a.test/alice"))
    assert received == []
    assert guard.counters["forged_from"] == 5
    await bus.close()


async def test_the_guard_keeps_a_bounded_number_of_senders_and_still_judges_each() -> None:
    bus, registry = await _registry()
    received: list[Message] = []
    guard = _guard(registry, "b.test", received)
    for index in range(MAX_CLEARED + 10):
        guard.from_stub(Message(type="update", from_=f"hyperty://b.test/u{index}", to="hyperty://a.test/alice"))
    guard.from_stub(Message(type="update", from_="hyperty://c.test/carol", to="hyperty://a.test/alice"))
    assert len(received) == MAX_CLEARED + 10
    assert guard.counters["forged_from"] == 1
    await bus.close()


async def test_a_destination_reachable_while_it_had_a_listener_is_refused_once_it_has_none() -> None:
    bus, registry = await _registry()
    record = registry.register_stub("b.test")
    boundary = StubBoundary(
        record,
        bus=bus,
        registry=registry,
        policy=BoundaryPolicy(),
        warnings=LogThrottle(get_logger("test")),
        clock=lambda: 0.0,
    )
    resource = "comm://a.test/room/changes"  # a subscribed resource: reachable while someone listens
    listener = bus.add_listener(resource, lambda msg: None)
    assert boundary.admit(Message(type="update", from_="hyperty://b.test/bob", to=resource))
    listener.remove()  # nobody listens: the bus would relay it to a.test's stub, which a stub may not make it do
    assert not boundary.admit(Message(type="update", from_="hyperty://b.test/bob", to=resource))
    assert record.counters["forbidden_destination"] == 1
    registry.add_local(resource)  # a declared local component is reachable again, listener or not
    assert boundary.admit(Message(type="update", from_="hyperty://b.test/bob", to=resource))
    await bus.close()


async def test_a_kept_route_follows_the_stub_table() -> None:
    bus, registry = await _registry()
    msg = Message(type="update", from_="hyperty://a.test/alice", to="hyperty://c.test/carol")
    assert registry.route(msg) == NeedsStub("c.test")
    record = registry.register_stub("c.test")
    assert registry.route(msg) == ToStub("c.test", record.url)
    assert registry.route(msg) == ToStub("c.test", record.url)  # kept
    registry.unregister_stub("c.test")
    assert registry.route(msg) == NeedsStub("c.test")
    again = registry.register_stub("c.test")
    assert registry.route(msg) == ToStub("c.test", again.url)
    assert again.url != record.url
    await bus.close()


async def test_return_paths_forget_the_oldest_first() -> None:
    bus, registry = await _registry()
    record = registry.register_stub("a.test")
    for number in range(MAX_RETURN_PATHS + 1):
        registry.remember_return(
            Message(id=number, type="execute", from_="hyperty://c.test/carol", to="x://y"), record.url
        )
    answer = lambda number: Message(  # noqa: E731
        id=number, type="response", from_="hyperty://a.test/alice", to="hyperty://c.test/carol"
    )
    registry.register_stub("c.test")  # without a return path, carol's domain's stub would get the answer
    assert registry.route(answer(0)) == ToStub("c.test", registry.stub("c.test").url)  # the oldest: forgotten
    assert registry.route(answer(1)) == ToStub("a.test", record.url)
    assert registry.route(answer(MAX_RETURN_PATHS)) == ToStub("a.test", record.url)
    await bus.close()


class _Sink(Component):
    def __init__(self, url: str) -> None:
        self.url = url
        self.isolation = {}
        self.counters = {}
        self.pid = None
        self.posted: deque[Message] = deque()

    def post(self, msg: Message) -> bool:
        self.posted.append(msg)
        return True

    async def execute(self, method, params=None, *, timeout):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def remove(self, grace: float = 2.0) -> None:
        return None


async def test_the_hand_over_ledger_releases_exactly_what_the_stub_reports_done() -> None:
    bus = MessageBus()
    store = SessionStore(bus)
    url = "hyperty-runtime://a.test/r/protostub/1"
    tracked = store.track("a.test", _Sink(url))
    state = lambda handed: Message(type="update", from_=url, to=f"{url}/state", body={"handedOver": handed})  # noqa: E731
    store.save("a.test", state(0))  # the stub reports: from now on every message is numbered
    messages = [
        Message(id=n, type="update", from_="hyperty://a.test/alice", to="hyperty://b.test/bob") for n in range(1, 8)
    ]
    for msg in messages:
        assert tracked.post(msg)
    assert store.pending("a.test") == 7
    store.save("a.test", state(3))
    assert store.pending("a.test") == 4
    store.save("a.test", state(2))  # an older report releases nothing more
    assert store.pending("a.test") == 4
    store.save("a.test", state(100))  # more than was posted: everything, and no more
    assert store.pending("a.test") == 0
    assert store.counters("a.test")["handed_over"] == 7
    tracked.post(messages[0])
    store.save("a.test", state(7))  # the 8th is not done yet
    assert store.pending("a.test") == 1
    next_instance = _Sink(url)
    store.track("a.test", next_instance)
    assert store.redeliver("a.test", next_instance) == 1
    assert list(next_instance.posted) == [messages[0]]
    await bus.close()
