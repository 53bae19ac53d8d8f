"""The stub's side of acknowledged delivery (``NodeSession``), sans I/O: numbered outbox, re-send, dedupe."""

from __future__ import annotations

import json

import pytest
from tests.unit.stubs.test_msgnode_session import RUNTIME, STUB, TOKEN, answer, frames, kinds, msg

from protofly.message import Message

SESSION = f"{RUNTIME}/{TOKEN}"


def ack_session(mn, saved=None, **extra):
    config = {"url": "ws://127.0.0.1:9/ws", "runtimeURL": RUNTIME, **extra}
    return mn.NodeSession(mn.Settings.load(config), STUB, rng=lambda low, high: high, saved=saved)


def live(mn, s, **body):
    s.socket_opened()
    (open_frame, _), *_ = frames(s)
    sent = json.loads(open_frame)
    reply = {"runtimeToken": TOKEN, "ack": True, "received": 0, "batch": True, "maxFrame": 1 << 20, **body}
    return sent, s.received(answer(open_frame, **reply))


def node_ack(n: int) -> bytes:
    return json.dumps({"type": "update", "from": "mn:/session", "to": SESSION, "body": {"ack": n}}).encode()


def node_numbered(seq: int, *ns: int) -> bytes:
    items = [
        {"id": n, "type": "update", "from": "hyperty://b.test/y", "to": "hyperty://a.test/x", "body": {"n": n}}
        for n in ns
    ]
    return json.dumps([seq, *items]).encode()


def test_open_asks_for_ack_and_the_session_is_saved(mn) -> None:
    s = ack_session(mn)
    sent, actions = live(mn, s)
    assert sent["body"]["ack"] is True
    assert s.ack_granted
    [save] = [a for a in actions if isinstance(a, mn.SaveState)]
    assert save.state == {"session": SESSION, "received": 0} and save.handed_over == 0


def test_outbox_is_numbered_kept_until_acked_and_handed_over_then(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    for n in range(3):
        assert s.submit(msg(n)) is None
    [(frame, count)] = frames(s)
    data = json.loads(frame)
    assert count == 3 and data[0] == 1 and [m["body"]["n"] for m in data[1:]] == [0, 1, 2]
    assert [seq for seq, _ in s.numbered_inflight()] == [1, 2, 3] and s.handed_over == 0
    actions = s.received(node_ack(2))
    [save] = [a for a in actions if isinstance(a, mn.SaveState)]
    assert save.handed_over == 2 and [seq for seq, _ in s.numbered_inflight()] == [3]


def test_after_a_lost_socket_the_re_open_resends_exactly_what_the_node_lacks(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    for n in range(4):
        s.submit(msg(n))
    frames(s)
    s.received(node_numbered(1, 10, 11))  # two messages from the node before the socket goes
    s.closed(1006, None)
    s.socket_opened()
    (reopen, _), *_ = frames(s)
    body = json.loads(reopen)["body"]
    assert json.loads(reopen)["type"] == "re-open" and body["ack"] is True and body["received"] == 2
    s.received(answer(reopen, ack=True, received=2, batch=True))  # the node got messages 1 and 2 before the socket went
    assert s.counters["resent"] == 2
    [(frame, _)] = [f for f in frames(s) if f[1]]
    data = json.loads(frame)
    assert data[0] == 3 and [m["body"]["n"] for m in data[1:]] == [2, 3]  # same numbers as before


def test_numbered_messages_from_the_node_are_delivered_once_and_acknowledged(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    first = s.received(node_numbered(1, 1, 2))
    again = s.received(node_numbered(2, 2, 3))  # a replay overlapping what was delivered
    delivered = [m.body["n"] for a in first + again if isinstance(a, mn.Deliver) for m in a.messages]
    assert delivered == [1, 2, 3] and s.counters["duplicates"] == 1
    saves = [a.state["received"] for a in first + again if isinstance(a, mn.SaveState)]
    assert saves == [2, 3]  # the runtime knows what a next instance must not receive again
    assert frames(s) == []  # nothing goes the node's way: the ack waits for the timer
    assert any(isinstance(a, mn.Wake) for a in s.ack_timer())
    acks = [json.loads(f) for f, count in frames(s) if count == 0]
    assert acks[-1]["body"] == {"ack": 3} and acks[-1]["to"] == "mn:/session"


def _acks(sent: list[tuple[bytes, int]]) -> list[int]:
    return [json.loads(f)["body"]["ack"] for f, count in sent if count == 0]


def test_an_ack_rides_with_the_next_frame_to_the_node(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    frames(s)
    actions = s.received(node_numbered(1, 1, 2))
    assert [a for a in actions if isinstance(a, mn.AckLater)] == [mn.AckLater(0.02)]
    assert not any(isinstance(a, mn.Wake) for a in actions)  # no wake-up of the writer for the ack alone
    s.received(node_numbered(3, 3))  # still owed: no second timer
    assert s.submit(msg(9)) is None  # the reply: the ack goes just before it, in the same writer pass
    sent = frames(s)
    assert _acks(sent) == [3] and [count for _, count in sent] == [0, 1]
    assert s.ack_timer() == [] and frames(s) == []  # the timer finds nothing owed


def test_an_ack_goes_alone_after_the_delay_when_nothing_goes_the_nodes_way(mn) -> None:
    s = ack_session(mn, ackDelay=0.005)
    live(mn, s)
    frames(s)
    actions = s.received(node_numbered(1, 1))
    assert [a for a in actions if isinstance(a, mn.AckLater)] == [mn.AckLater(0.005)]
    assert frames(s) == []
    s.ack_timer()
    assert _acks(frames(s)) == [1] and s.counters["acks"] == 1


def test_an_ack_goes_at_once_at_the_threshold_or_without_delay(mn) -> None:
    s = ack_session(mn, ackEvery=3)
    live(mn, s)
    frames(s)
    s.received(node_numbered(1, 1))
    actions = s.received(node_numbered(2, 2, 3))  # 3 since the last ack: the window must not fill
    assert any(isinstance(a, mn.Wake) for a in actions) and _acks(frames(s)) == [3]
    s.received(node_numbered(4, 4))  # counting starts again
    assert frames(s) == []
    big = ack_session(mn, ackEveryBytes=100)
    live(mn, big)
    frames(big)
    big.received(node_numbered(1, 1))  # one message of over 100 bytes
    assert _acks(frames(big)) == [1]
    none = ack_session(mn, ackDelay=0)
    live(mn, none)
    frames(none)
    actions = none.received(node_numbered(1, 1))
    assert not any(isinstance(a, mn.AckLater) for a in actions) and _acks(frames(none)) == [1]


def test_a_bad_ack_setting_is_refused_naming_the_key(mn) -> None:
    for key, value in (("ackDelay", -1), ("ackEvery", 0), ("ackEveryBytes", "x")):
        with pytest.raises(ValueError, match=f"configuration.{key}"):
            ack_session(mn, **{key: value})


def test_a_packed_frame_of_numbered_and_plain_messages_is_taken_apart(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    plain = {"id": 7, "type": "response", "from": "domain://msg-node.b.test/sm", "to": RUNTIME, "body": {"code": 200}}
    packed = json.dumps([json.loads(node_numbered(1, 1)), plain, json.loads(node_numbered(2, 2))]).encode()
    actions = s.received(packed)
    delivered = [m.id for a in actions if isinstance(a, mn.Deliver) for m in a.messages]
    assert delivered == [1, 7, 2]


def test_a_restarted_stub_re_opens_the_saved_session(mn) -> None:
    s = ack_session(mn, saved={"session": SESSION, "received": 5})
    actions = s.socket_opened()
    assert kinds(actions) == ["Status", "Wake"]
    (reopen, _), *_ = frames(s)
    sent = json.loads(reopen)
    assert sent["type"] == "re-open" and sent["from"] == SESSION and sent["body"]["received"] == 5
    s.received(answer(reopen, ack=True, received=0))
    actions = s.received(node_numbered(5, 5, 6))  # 5 was delivered by the previous instance
    assert [m.body["n"] for a in actions if isinstance(a, mn.Deliver) for m in a.messages] == [6]


def test_saved_state_of_another_runtime_is_ignored(mn) -> None:
    s = ack_session(mn, saved={"session": "hyperty-runtime://evil.test/rt/tok", "received": 5})
    s.socket_opened()
    (opened, _), *_ = frames(s)
    assert json.loads(opened)["type"] == "open"


def test_a_new_session_subscribes_again_to_what_the_runtime_had_subscribed(mn) -> None:
    s = ack_session(mn)
    live(mn, s)
    sm = "domain://msg-node.b.test/sm"
    sub = Message(id=1, type="subscribe", from_=RUNTIME + "/sm", to=sm, body={"resources": ["comm://b.test/o/changes"]})
    gone = Message(id=2, type="subscribe", from_=RUNTIME + "/sm", to=sm, body={"resources": ["comm://b.test/p"]})
    unsub = Message(id=3, type="unsubscribe", from_=RUNTIME + "/sm", to=sm, body={"resources": ["comm://b.test/p"]})
    for m in (sub, gone, unsub):
        assert s.submit(m) is None
    frames(s)
    s.received(node_ack(3))
    s.closed(1006, None)
    s.socket_opened()
    (reopen, _), *_ = frames(s)
    s.received(answer(reopen, 404, description="unknown session"))  # the node lost it: a new session
    (opened, _), *_ = frames(s)
    actions = s.received(answer(opened, runtimeToken="tok-2", ack=True, received=0, batch=True))
    assert any(isinstance(a, mn.Status) and (a.description or "").startswith("new session") for a in actions)
    [(frame, count)] = [f for f in frames(s) if f[1]]
    data = json.loads(frame)
    assert count == 1 and data[1]["type"] == "subscribe" and data[1]["body"]["resources"] == ["comm://b.test/o/changes"]
    reply = {"id": data[1]["id"], "type": "response", "from": sm, "to": RUNTIME + "/sm", "body": {"code": 200}}
    actions = s.received(json.dumps([1, reply]).encode())
    assert not [a for a in actions if isinstance(a, mn.Deliver)]  # our own re-subscription's answer
    assert s.counters["resubscribed"] == 1
