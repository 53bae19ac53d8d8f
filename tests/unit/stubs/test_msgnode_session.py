"""The message node stub's session protocol (``NodeSession``), sans I/O: events in, actions out."""

from __future__ import annotations

import json

import msgspec
import pytest

from protofly.message import Message, decode, encode

RUNTIME = "hyperty-runtime://a.test/rt1"
STUB = RUNTIME + "/protostub/1"
TOKEN = "tok-0123456789"
SECRET = "s3cret-access-token"


def settings(mn, **extra):
    # the plain protocol (and its batching and drain extensions); acknowledged delivery: test_msgnode_acks.py
    config = {"url": "ws://127.0.0.1:9/ws", "runtimeURL": RUNTIME, "ack": False, **extra}
    return mn.Settings.load(config)


def session(mn, rng=lambda low, high: high, **extra):
    return mn.NodeSession(settings(mn, **extra), STUB, rng=rng)


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def frames(s) -> list[tuple[bytes, int]]:
    out = []
    while (item := s.next_frame()) is not None:
        out.append(item)
    return out


def frame_messages(frame: bytes) -> list[dict]:
    data = json.loads(frame)
    return data if isinstance(data, list) else [data]


def answer(to_frame: bytes, code: int = 200, **body) -> bytes:
    request = json.loads(to_frame)
    return json.dumps(
        {
            "id": request["id"],
            "type": "response",
            "from": "mn:/session",
            "to": request["from"],
            "body": {"code": code, **body},
        }
    ).encode()


def msg(n: int, **extra) -> Message:
    return Message(id=n, type="create", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={"n": n, **extra})


def go_live(mn, s, *, batch=True, token=TOKEN):
    actions = s.socket_opened()
    assert kinds(actions) == ["Status", "Wake"] and actions[0].value == "in-progress"
    (open_frame, count), *_ = frames(s)
    assert count == 0
    body = {"runtimeToken": token}
    if batch:
        body.update(batch=True, maxFrame=1 << 20, drain=True)
    return open_frame, s.received(answer(open_frame, **body))


# -- settings ----------------------------------------------------------------------------------------


def test_settings_defaults_and_overrides(mn) -> None:
    s = settings(mn)
    assert (s.outbox_messages, s.batch, s.drain, s.open_timeout) == (100_000, True, True, 3.0)
    s = settings(mn, outboxMessages=5, batch=False, openTimeout=0.5, backoffBase=0, backoffCap=1)
    assert (s.outbox_messages, s.batch, s.open_timeout, s.backoff_base) == (5, False, 0.5, 0.0)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"url": None}, "configuration.url"),
        ({"url": "http://127.0.0.1/ws"}, "configuration.url"),
        ({"runtimeURL": ""}, "configuration.runtimeURL"),
        ({"urls": ["ws://127.0.0.1:8/ws", "http://x/ws"]}, "configuration.urls: expected a list of the cluster"),
        ({"urls": "ws://127.0.0.1:8/ws"}, "configuration.urls: expected a list of the cluster"),
        ({"outboxMessages": 0}, "configuration.outboxMessages: must be at least 1"),
        ({"outboxMessages": 2.5}, "configuration.outboxMessages: expected an integer"),
        ({"openTimeout": "3"}, "configuration.openTimeout: expected a number"),
        ({"batch": "yes"}, "configuration.batch: expected true or false"),
        ({"backoffBase": 2, "backoffCap": 1}, "backoffCap (1.0) is below backoffBase (2.0)"),
    ],
)
def test_bad_settings_name_the_key(mn, config, words) -> None:
    full = {"url": "ws://127.0.0.1:9/ws", "runtimeURL": RUNTIME, **config}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        mn.Settings.load(full)


# -- handshake -----------------------------------------------------------------------------------------


def test_open_asks_for_extensions_and_goes_live(mn) -> None:
    s = session(mn)
    s.set_credentials({"accessToken": SECRET, "other": "ignored"})
    open_frame, actions = go_live(mn, s)
    sent = json.loads(open_frame)
    assert sent["type"] == "open" and sent["from"] == RUNTIME and sent["to"] == "mn:/session"
    assert sent["body"] == {"batch": True, "drain": True, "accessToken": SECRET}
    assert kinds(actions) == ["Status", "Live"]
    assert actions[0].value == "live" and actions[0].description is None
    assert actions[1].fresh is False
    assert s.session_url == f"{RUNTIME}/{TOKEN}"
    assert (s.batch_granted, s.drain_granted, s.phase) == (True, True, "live")
    assert SECRET not in repr(s)


def test_plain_node_without_extensions_gets_one_message_per_frame(mn) -> None:
    s = session(mn, batch=False, drain=False)
    open_frame, _ = go_live(mn, s, batch=False)
    assert "body" not in json.loads(open_frame)  # exactly reTHINK's open: no body at all
    for n in range(3):
        assert s.submit(msg(n)) is None
    sent = frames(s)
    assert [count for _, count in sent] == [1, 1, 1]
    assert [json.loads(f)["body"]["n"] for f, _ in sent] == [0, 1, 2]


def test_answer_matches_an_id_re_encoded_as_string(mn) -> None:
    s = session(mn)
    s.socket_opened()
    ((open_frame, _),) = frames(s)
    reply = json.loads(answer(open_frame, runtimeToken=TOKEN))
    reply["id"] = str(reply["id"])
    assert kinds(s.received(json.dumps(reply).encode())) == ["Status", "Live"]


def test_open_200_without_token_closes_the_socket(mn) -> None:
    s = session(mn)
    s.socket_opened()
    ((open_frame, _),) = frames(s)
    actions = s.received(answer(open_frame))
    assert kinds(actions) == ["CloseSocket"]
    closed = s.closed(1002, None)
    assert closed[0].value == "failed" and "without a runtimeToken" in closed[0].description


# -- outbox --------------------------------------------------------------------------------------------


def test_messages_accepted_before_live_are_sent_in_order_with_via(mn) -> None:
    s = session(mn)
    for n in range(5):
        assert s.submit(msg(n)) is None
    assert frames(s) == []  # nothing flows before the session exists
    _, actions = go_live(mn, s)
    assert kinds(actions) == ["Status", "Live", "Wake"]
    ((frame, count),) = frames(s)
    assert count == 5
    sent = frame_messages(frame)
    assert [m["body"]["n"] for m in sent] == [0, 1, 2, 3, 4]
    assert all(m["body"]["via"] == STUB for m in sent)
    assert s.outbox_size == 0


def test_batches_respect_the_frame_limit(mn) -> None:
    s = session(mn, batchBytes=1000)
    go_live(mn, s)
    for n in range(40):
        s.submit(msg(n, pad="x" * 50))
    sent = frames(s)
    assert len(sent) > 1
    assert all(len(frame) <= 1000 for frame, _ in sent)
    numbers = [m["body"]["n"] for frame, _ in sent for m in frame_messages(frame)]
    assert numbers == list(range(40))
    assert sum(count for _, count in sent) == 40


def test_outbox_overflow_is_answered_503_and_loses_nothing_accepted(mn) -> None:
    s = session(mn, outboxMessages=3)
    assert [s.submit(msg(n)) for n in range(3)] == [None, None, None]
    refused = s.submit(msg(3))
    assert refused.message.body["code"] == 503 and "outbox is full" in refused.message.body["description"]
    assert refused.message.to == "hyperty://a.test/x" and refused.message.id == 3
    reply = Message(id=9, type="response", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={"code": 200})
    assert s.submit(reply) is None and s.counters["refused"] == 2  # a response cannot be answered: counted
    go_live(mn, s)
    ((frame, _),) = frames(s)
    assert [m["body"]["n"] for m in frame_messages(frame)] == [0, 1, 2]


def test_outbox_byte_bound_and_oversized_messages(mn) -> None:
    s = session(mn, outboxBytes=400, maxMessage=350)
    big = s.submit(msg(1, pad="x" * 400))
    assert big.message.body["code"] == 413 and "350-byte limit" in big.message.body["description"]
    assert s.submit(msg(2, pad="x" * 150)) is None
    full = s.submit(msg(3, pad="x" * 150))
    assert full.message.body["code"] == 503


def test_unserialisable_body_is_answered_400(mn) -> None:
    s = session(mn)
    bad = Message(id=1, type="create", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={"x": object()})
    refused = s.submit(bad)
    assert refused.message.body["code"] == 400 and "not JSON-serialisable" in refused.message.body["description"]


def test_unsent_frames_go_back_to_the_front_in_order(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    for n in range(4):
        s.submit(msg(n))
    frame, count = s.next_frame()
    s.submit(msg(4))
    s.unsent(frame, count)
    assert s.counters["requeued"] == 4
    ((again, total),) = frames(s)
    assert [m["body"]["n"] for m in frame_messages(again)] == [0, 1, 2, 3, 4] and total == 5


# -- losing and regaining the socket -----------------------------------------------------------------


def test_reconnect_reopens_and_falls_back_to_open_when_the_node_forgot(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    actions = s.closed(1006, None)
    assert kinds(actions) == ["Status", "Retry"]
    assert actions[0].value == "disconnected"
    assert actions[0].description == "1006 (abnormal closure, no close frame)"
    s.submit(msg(1))
    s.socket_opened()
    ((reopen, _),) = frames(s)
    sent = json.loads(reopen)
    assert (
        sent["type"] == "re-open"
        and sent["from"] == f"{RUNTIME}/{TOKEN}"
        and sent["body"] == {"batch": True, "drain": True}
    )
    actions = s.received(answer(reopen, 404, description="unknown session"))
    assert kinds(actions) == ["Wake"] and s.counters["reopen_fallbacks"] == 1
    ((fallback, _),) = frames(s)
    assert json.loads(fallback)["type"] == "open" and json.loads(fallback)["from"] == RUNTIME
    actions = s.received(answer(fallback, runtimeToken="tok-2", batch=True))
    assert kinds(actions) == ["Status", "Live", "Wake"]
    assert actions[1].fresh is True and "did not know" in actions[0].description
    assert s.session_url == f"{RUNTIME}/tok-2"
    ((frame, count),) = frames(s)
    assert count == 1 and json.loads(frame)["body"]["n"] == 1


def test_reopen_accepted_keeps_the_session_and_vertx_500_also_falls_back(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.closed(1001, "going")
    s.socket_opened()
    ((reopen, _),) = frames(s)
    actions = s.received(answer(reopen, 200, runtimeToken=TOKEN, batch=True))
    assert kinds(actions) == ["Status", "Live"] and actions[1].fresh is False
    assert s.session_url == f"{RUNTIME}/{TOKEN}"
    s.closed(1006, None)
    s.socket_opened()
    ((reopen, _),) = frames(s)
    s.received(answer(reopen, 500, desc="Reconnection fail. Incorrect runtime token!"))
    assert json.loads(frames(s)[0][0])["type"] == "open"


def test_backoff_is_capped_jittered_and_reset_by_success(mn) -> None:
    high = session(mn, backoffBase=0.1, backoffCap=1.0)
    go_live(mn, high)
    delays = []
    for _ in range(8):
        delays.append(high.closed(1006, None)[-1].delay if high.phase != "idle" else high.connect_failed("x")[-1].delay)
        high.phase = "live"
    assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert max(delays) == 1.0
    seen = []
    low = session(mn, rng=lambda a, b: seen.append((a, b)) or a, backoffBase=0.1, backoffCap=1.0)
    go_live(mn, low)
    first = low.closed(1006, None)[-1].delay
    second = low.connect_failed("refused")[-1].delay
    assert (first, second) == (0.0, 0.0)  # full jitter: a uniform draw from zero up to the step
    low.socket_opened()
    ((reopen, _),) = frames(low)
    low.received(answer(reopen, runtimeToken=TOKEN))
    low.closed(1006, None)
    assert [high for _, high in seen] == pytest.approx([0.1, 0.2, 0.1])  # the step starts over after live
    assert all(low == 0.0 for low, _ in seen)


def test_failure_before_first_live_fails_connect_instead_of_retrying(mn) -> None:
    s = session(mn)
    s.submit(msg(1))
    actions = s.connect_failed("ConnectionRefusedError: [Errno 111] Connect call failed")
    assert kinds(actions) == ["Status", "Failed", "Answer"]
    assert actions[0].value == "failed" and "cannot reach the message node" in actions[0].description
    assert actions[2].message.body["code"] == 503
    assert s.phase == "stopped"
    refused = s.submit(msg(2))
    assert refused.message.body["code"] == 503 and "connect() it first" in refused.message.body["description"]
    s.start()
    assert s.phase == "idle" and s.submit(msg(3)) is None


@pytest.mark.parametrize("code", [400, 401, 403])
def test_refused_credentials_fail_for_good(mn, code) -> None:
    s = session(mn)
    s.socket_opened()
    ((open_frame, _),) = frames(s)
    actions = s.received(answer(open_frame, code, description="open: this node requires body.accessToken"))
    assert kinds(actions) == ["Status", "Failed", "CloseSocket"]
    assert actions[0].value == "failed" and f"{code} open: this node requires" in actions[0].description
    assert s.closed(1000, "session refused") == []


def test_conflict_on_open_after_live_is_retried(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.closed(1006, None)
    s.socket_opened()
    ((reopen, _),) = frames(s)
    s.received(answer(reopen, 404))
    ((fallback, _),) = frames(s)
    actions = s.received(answer(fallback, 409, description="already has a connected session"))
    assert kinds(actions) == ["CloseSocket"]
    closed = s.closed(1000, "session refused")
    assert kinds(closed) == ["Status", "Retry"] and "409 already has a connected session" in closed[0].description


def test_open_timeout_closes_and_says_so(mn) -> None:
    s = session(mn, openTimeout=0.5)
    go_live(mn, s)
    s.closed(1006, None)
    s.socket_opened()
    assert kinds(s.open_timed_out()) == ["CloseSocket"]
    closed = s.closed(1000, "no answer to open")
    assert closed[0].description == "Timeout from mn:/session: no answer within 0.5 s"
    assert s.open_timed_out() == []  # not opening any more: nothing to do


@pytest.mark.parametrize(
    ("code", "reason", "text"),
    [
        (1000, "session closed", "1000 (normal closure): session closed"),
        (1001, None, "1001 (going away)"),
        (1013, "slow consumer", "1013 (try again later): slow consumer"),
        (4000, "", "4000 (session taken over by another connection)"),
        (4999, "x", "4999 (unknown reason): x"),
        (None, None, "1006 (abnormal closure, no close frame)"),
    ],
)
def test_close_codes_in_words(mn, code, reason, text) -> None:
    assert mn.close_description(code, reason) == text


# -- frames from the node --------------------------------------------------------------------------------


def test_session_traffic_is_consumed_and_the_rest_delivered_in_order(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    one = encode(msg(1))
    stale = json.dumps({"id": 99, "type": "response", "from": "mn:/session", "to": RUNTIME, "body": {"code": 200}})
    two = encode(msg(2))
    actions = s.received(b"[" + one + b"," + stale.encode() + b"," + two + b"]")
    assert kinds(actions) == ["Deliver", "Deliver"]
    assert [m.body["n"] for a in actions for m in a.messages] == [1, 2]
    assert s.counters["received"] == 2


def test_a_bad_element_costs_only_itself(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    actions = s.received(b"[" + encode(msg(1)) + b',{"type": "create"},' + encode(msg(3)) + b"]")
    assert [m.body["n"] for m in actions[0].messages] == [1, 3]
    assert s.counters["invalid"] == 1
    assert s.received(b"not json") == [] and s.received(b"[1, 2") == []
    assert s.counters["invalid"] == 3


def test_messages_before_the_session_is_granted_are_not_delivered(mn) -> None:
    s = session(mn)
    s.socket_opened()
    assert s.received(encode(msg(1))) == []
    assert s.counters["invalid"] == 1


# -- drain and disconnect ----------------------------------------------------------------------------------


def draining_notice() -> bytes:
    return json.dumps(
        {"type": "update", "from": "mn:/session", "to": f"{RUNTIME}/{TOKEN}", "body": {"value": "draining"}}
    ).encode()


def test_draining_sends_drained_last_and_holds_the_outbox(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.submit(msg(1))
    actions = s.received(draining_notice())
    assert kinds(actions) == ["Wake"] and s.phase == "draining"
    sent = frames(s)
    assert len(sent) == 1 and sent[0][1] == 0
    drained = json.loads(sent[0][0])
    assert drained["type"] == "update" and drained["from"] == f"{RUNTIME}/{TOKEN}"
    assert drained["to"] == "mn:/session" and drained["body"] == {"value": "drained"} and "id" in drained
    s.submit(msg(2))
    assert frames(s) == []  # nothing after 'drained'
    late = s.received(encode(msg(7)))  # the node may still deliver before it closes
    assert [m.body["n"] for m in late[0].messages] == [7]
    closed = s.closed(1001, "message node restarting")
    assert kinds(closed) == ["Status", "Retry"] and "drained the session" in closed[0].description
    s.socket_opened()
    ((reopen, _),) = frames(s)
    s.received(answer(reopen, runtimeToken=TOKEN, batch=True, drain=True))
    ((frame, count),) = frames(s)
    assert [m["body"]["n"] for m in frame_messages(frame)] == [1, 2] and count == 2


def test_disconnect_sends_the_outbox_then_close(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.submit(msg(1))
    assert kinds(s.disconnect()) == ["Wake"]
    refused = s.submit(msg(2))
    assert refused.message.body["code"] == 503
    sent = frames(s)
    assert [count for _, count in sent] == [1, 0]
    close = json.loads(sent[1][0])
    assert close["type"] == "close" and close["from"] == f"{RUNTIME}/{TOKEN}"
    actions = s.closed(1000, "session closed")
    assert kinds(actions) == ["Status"] and actions[0].description == "1000 (normal closure): session closed"
    assert s.phase == "stopped" and s.session_url is None


def test_disconnect_while_unreachable_answers_what_waits(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.closed(1006, None)
    s.submit(msg(1))
    actions = s.disconnect()
    assert kinds(actions) == ["Answer"] and actions[0].message.body["code"] == 503
    assert s.phase == "stopped" and s.closed(None, None) == []


def test_disconnect_while_draining_sends_nothing_more(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.received(draining_notice())
    frames(s)
    s.submit(msg(1))
    actions = s.disconnect()
    assert kinds(actions) == ["Answer"] and frames(s) == []
    assert s.closed(1001, None)[0].value == "disconnected" and s.phase == "stopped"


def test_credentials_must_hold_a_string_token_and_reopen_never_carries_it(mn) -> None:
    s = session(mn)
    with pytest.raises(ValueError, match="accessToken"):
        s.set_credentials({"accessToken": 12})
    s.set_credentials({"accessToken": SECRET})
    go_live(mn, s)
    s.closed(1006, None)
    s.socket_opened()
    ((reopen, _),) = frames(s)
    assert SECRET.encode() not in reopen


def test_frames_are_valid_protofly_messages(mn) -> None:
    s = session(mn)
    go_live(mn, s)
    s.submit(msg(1))
    frame, _ = s.next_frame()
    assert decode(frame).body == {"n": 1, "via": STUB}
    assert msgspec.json.decode(frame)["from"] == "hyperty://a.test/x"
