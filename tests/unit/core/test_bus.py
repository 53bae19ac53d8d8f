"""The message bus: every way a message can end is observable, none is silent."""

from __future__ import annotations

import asyncio
import logging

import pytest

from protofly.bus import BusClosedError, MessageBus, Rejected
from protofly.message import Message, response, response_code


def msg(
    to: str,
    *,
    sender: str = "hyperty://a.test/1",
    kind: str = "create",
    ident: int | str | None = None,
    body: dict | None = None,
) -> Message:
    return Message(id=ident, type=kind, from_=sender, to=to, body=body)


def echo_to(bus: MessageBus, code: int = 200):
    def handler(m: Message) -> None:
        if m.type != "response":
            bus.post(response(m, code, value=m.body))

    return handler


async def test_exact_address_routing_sync_and_async_listeners() -> None:
    bus = MessageBus()
    got_sync: list[Message] = []
    got_async: list[Message] = []
    done = asyncio.Event()

    async def async_handler(m: Message) -> None:
        got_async.append(m)
        done.set()

    bus.add_listener("hyperty://a.test/x", got_sync.append)
    bus.add_listener("hyperty://a.test/y", async_handler)
    bus.post(msg("hyperty://a.test/x"))
    bus.post(msg("hyperty://a.test/y"))
    await asyncio.wait_for(done.wait(), 1)
    assert [m.to for m in got_sync] == ["hyperty://a.test/x"]
    assert [m.to for m in got_async] == ["hyperty://a.test/y"]
    await bus.close()


async def test_listener_remove_stops_delivery_and_is_idempotent() -> None:
    bus = MessageBus()
    got: list[Message] = []
    handle = bus.add_listener("x:1", got.append)
    bus.post(msg("x:1"))
    handle.remove()
    handle.remove()
    assert not bus.has_listener("x:1")
    answer = await bus.request(msg("x:1"), timeout=1)
    assert len(got) == 1
    assert response_code(answer) == 404


async def test_delivery_in_order_per_sender_for_async_handlers() -> None:
    bus = MessageBus()
    seen: list[int] = []
    all_in = asyncio.Event()

    async def handler(m: Message) -> None:
        seen.append(m.body["n"])
        if len(seen) == 200:
            all_in.set()

    bus.add_listener("x:1", handler)
    for n in range(200):
        bus.post(msg("x:1", body={"n": n}))
    await asyncio.wait_for(all_in.wait(), 2)
    assert seen == list(range(200))
    await bus.close()


async def test_request_response_roundtrip_allocates_ids_per_sender() -> None:
    bus = MessageBus()
    bus.add_listener("x:svc", echo_to(bus))
    first = await bus.request(msg("x:svc", sender="a:1", body={"q": 1}), timeout=1)
    second = await bus.request(msg("x:svc", sender="a:1", body={"q": 2}), timeout=1)
    other = await bus.request(msg("x:svc", sender="b:1", body={"q": 3}), timeout=1)
    assert (first.id, second.id, other.id) == (1, 2, 1)
    assert [r.body["value"] for r in (first, second, other)] == [{"q": 1}, {"q": 2}, {"q": 3}]
    assert bus.pending_requests == 0


async def test_timeout_gives_synthetic_408() -> None:
    bus = MessageBus()
    bus.add_listener("x:silent", lambda m: None)
    answer = await bus.request(msg("x:silent", ident=5), timeout=0.05)
    assert answer.type == "response"
    assert response_code(answer) == 408
    assert answer.id == 5
    assert answer.from_ == "x:silent"
    assert "x:silent" in answer.body["description"]
    assert bus.stats.timeouts == 1
    assert bus.pending_requests == 0


async def test_timer_cancelled_when_response_arrives(make_inbox) -> None:
    bus = MessageBus()
    bus.add_listener("x:svc", echo_to(bus))
    held = make_inbox()
    bus.add_listener("x:silent", held.append)
    answered = await bus.request(msg("x:svc", ident=7), timeout=0.05)
    assert response_code(answered) == 200
    # The same sender reuses id 7 for a long request.  Had the answered request's timer stayed armed, its
    # deadline would time this one out 10 s early.
    reused = asyncio.create_task(bus.request(msg("x:silent", ident=7), timeout=10))
    await held.wait_for(1, timeout=1)
    # A request from another sender, started later with the same timeout: its 408 comes after the first
    # request's deadline has passed, so once it is in, any leftover timer has fired.
    later = await bus.request(msg("x:silent", sender="hyperty://b.test/1", ident=7), timeout=0.05)
    assert response_code(later) == 408
    assert bus.stats.timeouts == 1
    assert not reused.done()
    assert bus.pending_requests == 1
    bus.post(response(held[0], 200, value="late but in time"))
    assert (await reused).body["value"] == "late but in time"
    assert bus.pending_requests == 0


async def test_unknown_destination_gets_404() -> None:
    bus = MessageBus()
    answer = await bus.request(msg("hyperty://nowhere.test/1"), timeout=1)
    assert response_code(answer) == 404
    assert "hyperty://nowhere.test/1" in answer.body["description"]
    assert bus.stats.unroutable == 1


async def test_unknown_destination_404_reaches_a_posting_sender() -> None:
    bus = MessageBus()
    inbox: list[Message] = []
    bus.add_listener("hyperty://a.test/1", inbox.append)
    bus.post(msg("hyperty://nowhere.test/1", ident=9))
    assert len(inbox) == 1 and response_code(inbox[0]) == 404 and inbox[0].id == 9


async def test_resolver_sync_and_async(make_inbox) -> None:
    bus = MessageBus()
    stub_inbox = make_inbox()
    bus.add_listener("hyperty-runtime://a.test/rt/protostub/1", stub_inbox.append)
    ready = asyncio.Event()

    async def slow_resolver(m: Message) -> str | None:
        await ready.wait()
        return "hyperty-runtime://a.test/rt/protostub/1"

    bus.set_resolver(lambda m: "hyperty-runtime://a.test/rt/protostub/1" if "b.test" in m.to else slow_resolver(m))
    bus.post(msg("hyperty://b.test/1"))
    assert len(stub_inbox) == 1
    bus.post(msg("hyperty://c.test/1"))
    assert len(stub_inbox) == 1
    ready.set()
    await stub_inbox.wait_for(2, timeout=1)
    assert stub_inbox[1].to == "hyperty://c.test/1"
    await bus.close()


async def test_resolver_that_fails_or_hangs_answers_the_sender() -> None:
    bus = MessageBus(resolve_timeout=0.05)

    async def broken(m: Message) -> str | None:
        raise RuntimeError("catalogue down")

    async def hangs(m: Message) -> str | None:
        await asyncio.Event().wait()
        return None

    bus.set_resolver(broken)
    failed = await bus.request(msg("hyperty://b.test/1"), timeout=1)
    assert response_code(failed) == 503 and "catalogue down" in failed.body["description"]
    bus.set_resolver(hangs)
    slow = await bus.request(msg("hyperty://b.test/1"), timeout=1)
    assert response_code(slow) == 504
    await bus.close()


async def test_message_is_not_routed_back_into_the_stub_it_came_from() -> None:
    bus = MessageBus()
    stub = "hyperty-runtime://a.test/rt/protostub/1"
    stub_inbox: list[Message] = []
    bus.add_listener(stub, stub_inbox.append)
    bus.set_resolver(lambda m: stub)
    answer = await bus.request(msg("hyperty://b.test/1", body={"via": stub}), timeout=1)
    assert response_code(answer) == 508
    assert stub_inbox == []
    assert bus.stats.loops == 1


async def test_interceptor_pass_rewrite_and_reject() -> None:
    bus = MessageBus()
    inbox: list[Message] = []
    bus.add_listener("x:svc", inbox.append)
    order: list[str] = []

    def first(m: Message) -> Message:
        order.append("first")
        if m.body and m.body.get("forbidden"):
            raise Rejected(403, "forbidden by test policy")
        return m

    def second(m: Message) -> Message:
        order.append("second")
        body = dict(m.body or {})
        body["stamped"] = True
        return Message(id=m.id, type=m.type, from_=m.from_, to=m.to, body=body)

    bus.add_interceptor(first)
    remove_second = bus.add_interceptor(second)
    bus.post(msg("x:svc", body={"ok": 1}))
    assert inbox[-1].body == {"ok": 1, "stamped": True}
    assert order == ["first", "second"]

    denied = await bus.request(msg("x:svc", body={"forbidden": True}), timeout=1)
    assert response_code(denied) == 403
    assert denied.body["description"] == "forbidden by test policy"
    assert len(inbox) == 1
    assert bus.stats.rejected == 1

    remove_second()
    bus.post(msg("x:svc", body={"ok": 2}))
    assert inbox[-1].body == {"ok": 2}


async def test_interceptor_that_raises_is_an_error_response_not_a_crash() -> None:
    bus = MessageBus()
    bus.add_listener("x:svc", echo_to(bus))

    def broken(m: Message) -> Message:
        if m.type != "response":
            raise KeyError("bug")
        return m

    bus.add_interceptor(broken)
    answer = await bus.request(msg("x:svc"), timeout=1)
    assert response_code(answer) == 500


async def test_raising_handler_does_not_stop_others_and_requester_gets_500(caplog) -> None:
    bus = MessageBus()
    good: list[Message] = []

    def bad(m: Message) -> None:
        raise ValueError("boom")

    bus.add_listener("x:svc", bad)
    bus.add_listener("x:svc", good.append)
    with caplog.at_level(logging.ERROR, logger="protofly.bus"):
        answer = await bus.request(msg("x:svc"), timeout=1)
    assert response_code(answer) == 500
    assert len(good) == 1
    assert bus.stats.handler_errors == 1
    assert any("listener raised" in r.getMessage() for r in caplog.records)
    # the bus keeps working
    bus.add_listener("x:other", echo_to(bus))
    assert response_code(await bus.request(msg("x:other"), timeout=1)) == 200


async def test_raising_async_handler_gets_500_too() -> None:
    bus = MessageBus()

    async def bad(m: Message) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("late boom")

    bus.add_listener("x:svc", bad)
    answer = await bus.request(msg("x:svc"), timeout=1)
    assert response_code(answer) == 500
    await bus.close()


async def test_provisional_responses_keep_the_request_open() -> None:
    bus = MessageBus()
    provisional: list[Message] = []

    def slow_service(m: Message) -> None:
        bus.post(response(m, 100, "working"))
        bus.post(response(m, 101, "still working"))
        asyncio.get_running_loop().call_soon(bus.post, response(m, 200, value="done"))

    bus.add_listener("x:svc", slow_service)
    answer = await bus.request(msg("x:svc"), timeout=1, on_provisional=provisional.append)
    assert [response_code(p) for p in provisional] == [100, 101]
    assert response_code(answer) == 200 and answer.body["value"] == "done"


async def test_two_senders_with_the_same_id_get_their_own_responses(make_inbox) -> None:
    bus = MessageBus()
    held = make_inbox()
    bus.add_listener("x:svc", held.append)
    first = asyncio.create_task(bus.request(msg("x:svc", sender="a:1", ident=1, body={"who": "a"}), timeout=1))
    second = asyncio.create_task(bus.request(msg("x:svc", sender="b:1", ident=1, body={"who": "b"}), timeout=1))
    await held.wait_for(2, timeout=1)
    for request in reversed(held):  # answer in the opposite order
        bus.post(response(request, 200, value=request.body["who"]))
    assert (await first).body["value"] == "a"
    assert (await second).body["value"] == "b"


async def test_response_id_in_the_other_form_still_correlates() -> None:
    bus = MessageBus()
    bus.add_listener(
        "x:svc", lambda m: bus.post(Message(id=int(m.id), type="response", from_=m.to, to=m.from_, body={"code": 200}))
    )
    answer = await bus.request(msg("x:svc", ident="17"), timeout=1)
    assert response_code(answer) == 200


async def test_duplicate_pending_id_is_refused() -> None:
    bus = MessageBus()
    bus.add_listener("x:svc", lambda m: None)
    first = asyncio.create_task(bus.request(msg("x:svc", ident=3), timeout=1))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="already waiting"):
        await bus.request(msg("x:svc", ident=3), timeout=1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert bus.pending_requests == 0


async def test_undeliverable_responses_are_counted_not_answered() -> None:
    bus = MessageBus()
    bus.post(Message(id=1, type="response", from_="x:a", to="x:nobody", body={"code": 200}))
    assert bus.stats.dropped_responses == 1
    assert bus.stats.by_code.get(404) == 1


async def test_error_for_a_request_after_close_is_counted_as_such_not_as_a_dropped_response(caplog) -> None:
    bus = MessageBus()
    entered = asyncio.Event()

    async def handler(m: Message) -> None:
        try:
            entered.set()
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")  # turns close()'s cancellation into a listener failure

    bus.add_listener("x:svc", handler)
    bus.post(msg("x:svc", ident=4))
    await asyncio.wait_for(entered.wait(), 1)
    with caplog.at_level(logging.INFO, logger="protofly.bus"):
        await bus.close()
        bus.reply_error(msg("x:svc", ident=5), 503, "shutting down")  # what the runtime may do late
    assert bus.stats.handler_errors == 1
    assert bus.stats.dropped_after_close == 2
    assert bus.stats.dropped_responses == 0
    events = [r.getMessage() for r in caplog.records if r.name == "protofly.bus"]
    assert "undeliverable response dropped" not in events
    closed = [r for r in caplog.records if r.getMessage() == "bus closed: error response not sent"]
    assert [(r.type, r.id, r.code) for r in closed] == [("create", 4, 500), ("create", 5, 503)]


async def test_undeliverable_response_on_a_closed_bus_is_still_a_dropped_response() -> None:
    bus = MessageBus()
    await bus.close()
    bus.reply_error(Message(id=1, type="response", from_="x:a", to="x:b", body={"code": 200}), 500, "late")
    assert (bus.stats.dropped_responses, bus.stats.dropped_after_close) == (1, 0)


async def test_publish_without_listener_is_quiet() -> None:
    bus = MessageBus()
    assert bus.publish(msg("x:status", kind="update")) == 0
    got: list[Message] = []
    bus.add_listener("x:status", got.append)
    assert bus.publish(msg("x:status", kind="update")) == 1
    assert len(got) == 1
    assert bus.stats.unroutable == 0


async def test_close_answers_waiting_requests_and_refuses_new_ones() -> None:
    bus = MessageBus()
    bus.add_listener("x:silent", lambda m: None)
    waiting = asyncio.create_task(bus.request(msg("x:silent"), timeout=10))
    await asyncio.sleep(0)
    await bus.close()
    assert response_code(await asyncio.wait_for(waiting, 1)) == 503
    with pytest.raises(BusClosedError):
        bus.post(msg("x:silent"))


def test_bad_listener_address_is_refused() -> None:
    bus = MessageBus()
    with pytest.raises(ValueError):
        bus.add_listener("", print)
