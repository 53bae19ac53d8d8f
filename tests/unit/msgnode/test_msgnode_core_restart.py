"""Lossless restart in the sans-I/O core: drain handshake, buffers of detached sessions, state snapshots."""

from __future__ import annotations

import copy
import json

import pytest
from tests.unit.msgnode.test_msgnode_core import ALLOC, SM, Conn, D, Node, only, sent

from protofly.msgnode.actions import Close, CloseCode, Drained, EnableBatch, Replay, Send, SessionEnded
from protofly.msgnode.core import SESSION_URL
from protofly.msgnode.snapshot import STATE_FORMAT, StateError

RESOURCE = "comm://a.test/room/changes"


@pytest.fixture
def node() -> Node:
    return Node()


def drained(url: str, **extra) -> dict:
    return {"type": "update", "from_": url, "to": SESSION_URL, "body": {"value": "drained"}, **extra}


def replayed(actions) -> list[dict]:
    return [json.loads(f) for a in actions if isinstance(a, Replay) for f in a.frames]


def drain_session(node: Node, name: str) -> tuple[Conn, str]:
    conn = node.connect(name)
    runtime = f"hyperty-runtime://{name}.test/rt"
    reply = node.open(conn, runtime, drain=True)
    assert reply["body"]["drain"] is True
    return conn, f"{runtime}/{reply['body']['runtimeToken']}"


# -- drain extension ------------------------------------------------------------------------------------


def test_drain_is_granted_only_when_asked_at_open_or_reopen(node):
    plain, url = node.session("plain")
    assert "drain" not in node.open(plain, "hyperty-runtime://plain.test/rt")["body"]
    node.core.disconnected(plain, now=0.0)
    again = node.connect("again")
    reply = only(node.send(again, type="re-open", from_=url, to=SESSION_URL, body={"drain": True}))
    assert reply["body"] == {"code": 200, "runtimeToken": url.rsplit("/", 1)[1], "drain": True}
    assert node.core.session(url).drain is True


def test_begin_drain_tells_only_drain_sessions_and_routing_goes_on(node):
    a, a_url = drain_session(node, "a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    actions = node.core.begin_drain()
    assert [(x.conn, json.loads(x.data)) for x in actions] == [
        (a, {"id": 1, "type": "update", "from": SESSION_URL, "to": a_url, "body": {"value": "draining"}})
    ]
    assert node.core.drain_pending == 1 and node.core.plain_connections() == 1
    assert node.core.begin_drain() == []  # once
    # the drain client still sends (what it had in flight) and it is routed
    assert [x.conn for x in node.send(a, type="update", from_="hyperty-runtime://a.test/rt", to=hb)] == [b]


def test_drained_is_the_last_frame_and_is_not_answered(node):
    a, a_url = drain_session(node, "a")
    c, c_url = drain_session(node, "c")
    node.core.begin_drain()
    assert node.send(a, **drained(a_url)) == [Drained(a, 1)]
    assert node.send(a, **drained(a_url)) == []  # said twice: nothing more to report
    assert node.send(c, **drained(c_url, body={"value": "DRAINED"})) == [Drained(c, 0)]
    assert node.core.drain_pending == 0 and node.core.counters["drained"] == 2


def test_a_drain_client_that_goes_away_counts_as_drained(node):
    a, _ = drain_session(node, "a")
    node.core.begin_drain()
    assert node.core.disconnected(a, now=1.0) == [Drained(a, 0)]


@pytest.mark.parametrize(
    ("drain", "draining", "body", "code", "words"),
    [
        (True, False, {"value": "drained"}, 409, "not draining"),
        (False, True, {"value": "drained"}, 409, "did not negotiate"),
        (True, True, {"value": "live"}, 400, "body.value"),
        (True, True, None, 400, "body.value"),
    ],
)
def test_misplaced_drained_messages_are_refused(node, drain, draining, body, code, words):
    conn = node.connect("a")
    token = node.open(conn, "hyperty-runtime://a.test/rt", **({"drain": True} if drain else {}))["body"]["runtimeToken"]
    if draining:
        node.core.begin_drain()
    reply = only(
        node.send(
            conn,
            type="update",
            from_=f"hyperty-runtime://a.test/rt/{token}",
            to=SESSION_URL,
            **({"body": body} if body is not None else {}),
        ),
        conn,
    )
    assert reply["body"]["code"] == code and words in reply["body"]["description"]


def test_a_drain_client_opening_during_the_drain_is_told_at_once(node):
    node.core.begin_drain()
    conn = node.connect("late")
    actions = node.send(
        conn, id=5, type="open", from_="hyperty-runtime://late.test/rt", to=SESSION_URL, body={"drain": True}
    )
    first, second = sent(actions, conn)
    assert first["id"] == 5 and first["body"]["code"] == 200
    assert second["body"] == {"value": "draining"} and node.core.drain_pending == 1


def test_close_plain_closes_plain_connections_and_detaches_their_sessions_first(node):
    a, _ = drain_session(node, "a")
    b, b_url = node.session("b")
    [hb] = node.allocate(b)
    idle = node.connect("idle")  # no session at all
    node.core.begin_drain()
    actions = node.core.close_plain(now=10.0)
    assert sorted((x.conn.name, x.code) for x in actions if isinstance(x, Close)) == [
        ("b", CloseCode.GOING_AWAY),
        ("idle", CloseCode.GOING_AWAY),
    ]
    assert node.core.session(b_url).conn is None and node.core.next_deadline() == 10.0 + node.core.session_grace
    # from now on, messages for b wait in its buffer rather than going to a closing socket
    assert node.send(a, type="update", from_="hyperty-runtime://a.test/rt", to=hb, body={"n": 1}) == []
    assert len(node.core.session(b_url).buffer) == 1
    assert node.send(b, type="update", from_="hyperty-runtime://b.test/rt", to=hb) == []  # ignored after close
    assert node.core.disconnected(b, now=11.0) == [] and node.core.disconnected(idle, now=11.0) == []
    assert node.core.plain_connections() == 0


def test_finish_drain_closes_everyone_and_counts_drain_timeouts(node):
    a, a_url = drain_session(node, "a")
    c, _ = drain_session(node, "c")
    node.core.begin_drain()
    node.send(a, **drained(a_url))
    actions = node.core.finish_drain(now=3.0)
    assert sorted((x.conn.name, x.code) for x in actions) == [("a", CloseCode.GOING_AWAY), ("c", CloseCode.GOING_AWAY)]
    assert node.core.counters["drain_timeouts"] == 1
    assert all(s.conn is None for s in node.core.sessions)
    assert node.send(c, type="update", from_="hyperty-runtime://c.test/rt", to=a_url) == []
    assert node.core.counters["ignored_after_close"] == 1


# -- buffering for detached sessions ------------------------------------------------------------------------


def test_buffered_messages_are_replayed_in_order_right_after_the_reopen_200():
    node = Node()
    a, _ = node.session("a")
    b, b_url = node.session("b")
    [hb] = node.allocate(b)
    node.send(b, type="subscribe", from_="hyperty-runtime://b.test/rt/sm", to=SM, body={"resources": [RESOURCE]})
    node.core.disconnected(b, now=0.0)
    frames = [
        node.core.received(
            a,
            json.dumps(
                {"id": n, "type": "update", "from": "hyperty-runtime://a.test/rt", "to": hb, "body": {"n": n}}
            ).encode(),
        )
        for n in range(3)
    ]
    assert frames == [[], [], []]
    node.send(a, id=3, type="update", from_="comm://a.test/room", to=RESOURCE, body={"n": 3})  # fan-out
    node.send(a, id=4, type="update", from_="hyperty-runtime://a.test/rt", to=b_url, body={"n": 4})  # runtime URL
    again = node.connect("b-again")
    actions = node.send(again, id=9, type="re-open", from_=b_url, to=SESSION_URL, body={"batch": True})
    assert [type(x) for x in actions] == [Send, EnableBatch, Replay]
    assert json.loads(actions[0].data)["id"] == 9
    assert [m["body"]["n"] for m in replayed(actions)] == [0, 1, 2, 3, 4]
    assert node.core.counters["buffered"] == 5 and node.core.counters["replayed"] == 5
    assert node.core.session(b_url).buffer == [] and node.core.session(b_url).buffer_bytes == 0
    # and live again: straight to the socket
    assert [x.conn for x in node.send(a, type="update", from_="hyperty-runtime://a.test/rt", to=hb)] == [again]


def test_point_to_point_frames_are_buffered_as_received():
    node = Node()
    a, _ = node.session("a")
    b, b_url = node.session("b")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    data = b'{"id":"x","type":"UPDATE","from":"hyperty-runtime://a.test/rt","to":["%s"],"body":{"k":[1]}}' % hb.encode()
    node.core.received(a, data)
    assert node.core.session(b_url).buffer == [data]


@pytest.mark.parametrize(("limits", "size"), [({"buffer_messages": 2}, 10), ({"buffer_bytes": 450}, 100)])
def test_a_full_buffer_is_503_to_the_sender_and_keeps_what_it_has(limits, size):
    node = Node(**limits)
    a, _ = node.session("a")
    b, b_url = node.session("b")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    body = {"p": "x" * size}
    for n in range(2):
        assert node.send(a, id=n, type="update", from_="hyperty-runtime://a.test/rt", to=hb, body=body) == []
    reply = only(node.send(a, id=7, type="update", from_="hyperty-runtime://a.test/rt", to=hb, body=body))
    assert reply["id"] == 7 and reply["body"]["code"] == 503
    assert "detached" in reply["body"]["description"] and "buffer is full" in reply["body"]["description"]
    # a response cannot be answered: counted, never silent
    assert node.send(a, type="response", from_="hyperty-runtime://a.test/rt", to=hb, body={"code": 200}) == []
    assert node.core.counters["buffer_full"] == 2 and node.core.counters["responses_dropped"] == 1
    assert len(node.core.session(b_url).buffer) == 2


def test_a_fan_out_that_finds_full_subscriber_buffers_is_one_503_to_the_publisher():
    node = Node(buffer_messages=1)
    subscribers = [node.session(f"s{i}") for i in range(3)]
    for conn, _ in subscribers:
        node.send(conn, type="subscribe", from_="x:y", to=SM, body={"resources": [RESOURCE]})
    for conn, _ in subscribers[1:]:
        node.core.disconnected(conn, now=0.0)
    publisher, _ = node.session("pub")
    first = node.send(publisher, id=1, type="update", from_="comm://a.test/room", to=RESOURCE, body={})
    assert [x.conn for x in first] == [subscribers[0][0]]
    second = node.send(publisher, id=2, type="update", from_="comm://a.test/room", to=RESOURCE, body={})
    assert [x.conn for x in second] == [subscribers[0][0], publisher]
    reply = json.loads(second[1].data)
    assert reply["id"] == 2 and reply["body"]["code"] == 503
    assert "2 subscriber session(s)" in reply["body"]["description"]


def test_an_expiring_session_answers_each_buffered_message_but_responses_with_410():
    node = Node(session_grace=5.0)
    a, _ = node.session("a")
    b, b_url = node.session("b")
    [ha] = node.allocate(a)
    [hb] = node.allocate(b)
    [room] = node.allocate(a, scheme="comm")
    node.send(b, type="subscribe", from_="x:y", to=SM, body={"resources": [RESOURCE]})
    node.core.disconnected(b, now=0.0)
    node.send(a, id=1, type="read", from_=ha, to=hb)
    node.send(a, id=2, type="response", from_=ha, to=hb, body={"code": 200})  # a response is never answered
    node.send(a, id=3, type="update", from_=room, to=RESOURCE, body={})  # the publisher learns who missed it
    node.send(a, id=4, type="update", from_="hyperty-runtime://a.test/rt", to=hb)
    actions = node.core.tick(5.0)
    assert [(x.reason, x.url) for x in actions if isinstance(x, SessionEnded)] == [("expired", b_url)]
    replies = sent(actions, a)
    assert [(r["id"], r["from"], r["to"], r["body"]["code"]) for r in replies] == [
        (1, hb, ha, 410),
        (3, RESOURCE, room, 410),
        (4, hb, "hyperty-runtime://a.test/rt", 410),
    ]
    assert f"its session {b_url} expired before this message could be delivered" in replies[1]["body"]["description"]
    assert node.core.counters["buffer_answered"] == 3 and node.core.counters["buffer_discarded"] == 1


def test_a_410_for_a_detached_sender_waits_in_its_buffer():
    node = Node(session_grace=5.0)
    a, a_url = node.session("a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    node.send(a, id=1, type="read", from_="hyperty-runtime://a.test/rt", to=hb)
    node.core.disconnected(a, now=1.0)
    assert [type(x) for x in node.core.tick(5.0)] == [SessionEnded]  # b expired; a still has grace
    again = node.connect("a-again")
    actions = node.send(again, type="re-open", from_=a_url, to=SESSION_URL)
    [gone] = replayed(actions)
    assert gone["id"] == 1 and gone["body"]["code"] == 410


def test_a_replaced_session_answers_its_buffer_with_410_too(node):
    a, _ = node.session("a")
    b, _ = node.session("b", "hyperty-runtime://b.test/rt")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    node.send(a, id=1, type="read", from_="hyperty-runtime://a.test/rt", to=hb)
    fresh = node.connect("b2")
    actions = node.send(fresh, type="open", from_="hyperty-runtime://b.test/rt", to=SESSION_URL)
    reply = only(actions, a)
    assert reply["body"]["code"] == 410 and "replaced" in reply["body"]["description"]


# -- state snapshot ---------------------------------------------------------------------------------------


def busy_node() -> tuple[Node, dict]:
    """A node with every kind of state: keys, bound hyperties, subscriptions with sources, buffers."""
    node = Node(session_grace=30.0)
    a, a_url = drain_session(node, "a")
    b, b_url = node.session("b")
    block = node.allocate(a, value={"number": 2, "allocationKey": "room"})
    [single] = node.allocate(a, to=f"domain://msg-node.{D}/object-address-allocation", scheme="comm")
    node.send(b, id=1, type="update", from_="hyperty://f.test/foreign", to=block[0], body={})  # binds to b
    node.send(a, type="subscribe", from_="x:y", to=SM, body={"resources": [RESOURCE], "source": "hyperty://a.test/h1"})
    node.send(a, type="subscribe", from_="x:y", to=SM, body={"resources": [RESOURCE], "source": "hyperty://a.test/h2"})
    node.core.disconnected(a, now=0.0)
    node.send(b, id=2, type="update", from_="hyperty://f.test/foreign", to=single, body={"n": 2})
    node.send(b, id=3, type="update", from_="comm://x.test/o", to=RESOURCE, body={"n": 3})
    return node, {"a": a_url, "b": b_url, "block": block, "single": single}


def test_snapshot_is_plain_json_and_round_trips():
    node, _ = busy_node()
    snapshot = node.core.snapshot()
    assert snapshot == json.loads(json.dumps(snapshot))
    assert snapshot["format"] == STATE_FORMAT and snapshot["domain"] == D
    fresh = Node()
    assert fresh.core.restore(copy.deepcopy(snapshot), now=100.0) == 2
    assert fresh.core.snapshot() == snapshot
    assert fresh.core.counters["sessions_restored"] == 2


def test_a_restored_node_routes_addresses_subscriptions_and_replays_buffers_after_reopen():
    node, names = busy_node()
    fresh = Node(session_grace=10.0)
    fresh.core.restore(node.core.snapshot(), now=100.0)
    a_session = fresh.core.session(names["a"])
    assert a_session.conn is None and a_session.deadline == 110.0 and fresh.core.next_deadline() == 110.0
    assert a_session.drain is True and a_session.keys == {"room": names["block"]}
    assert fresh.core.owner("hyperty://f.test/foreign") is fresh.core.session(names["b"])
    # b comes back first; what it sends to a (still detached) joins a's buffer
    b = fresh.connect("b")
    assert only(fresh.send(b, type="re-open", from_=names["b"], to=SESSION_URL))["body"]["code"] == 200
    fresh.send(b, id=4, type="update", from_="hyperty://f.test/foreign", to=names["single"], body={"n": 4})
    fresh.send(b, id=5, type="update", from_="comm://x.test/o", to=RESOURCE, body={"n": 5})
    a = fresh.connect("a")
    actions = fresh.send(a, type="re-open", from_=names["a"], to=SESSION_URL, body={"drain": True})
    assert [m["body"]["n"] for m in replayed(actions)] == [2, 3, 4, 5]
    # and the reply from a to the foreign hyperty routes back through b
    back = fresh.send(
        a, id=6, type="response", from_=names["single"], to="hyperty://f.test/foreign", body={"code": 200}
    )
    assert [x.conn for x in back] == [b]


def test_restored_sessions_not_reopened_in_time_expire():
    node, names = busy_node()
    fresh = Node(session_grace=10.0)
    fresh.core.restore(node.core.snapshot(), now=0.0)
    ended = [x for x in fresh.core.tick(10.0) if isinstance(x, SessionEnded)]
    assert sorted(x.url for x in ended) == sorted([names["a"], names["b"]])
    assert fresh.core.session_count == 0 and fresh.core.address_count == 0


def test_frames_that_are_not_utf8_survive_the_snapshot_as_base64():
    node = Node()
    a, _ = node.session("a")
    b, b_url = node.session("b")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    data = b'{"type":"update","from":"hyperty-runtime://a.test/rt","to":"%s","x":"\xff"}' % hb.encode()
    node.core.received(a, data)
    snapshot = json.loads(json.dumps(node.core.snapshot()))
    [saved] = [s for s in snapshot["sessions"] if s["runtimeURL"] == "hyperty-runtime://b.test/rt"]
    assert "base64" in saved["buffer"][0]
    fresh = Node()
    fresh.core.restore(snapshot, now=0.0)
    assert fresh.core.session(b_url).buffer == [data]


def _session(**fields) -> dict:
    return {"runtimeURL": "hyperty-runtime://a.test/rt", "token": "t1", **fields}


def _state(*sessions: dict, **fields) -> dict:
    return {"format": STATE_FORMAT, "version": 1, "domain": D, "sessions": list(sessions), **fields}


@pytest.mark.parametrize(
    ("snapshot", "words"),
    [
        ([], "state: Expected `object`"),
        ({"format": STATE_FORMAT}, "missing required field"),
        (_state(format="something-else"), "format:"),
        (_state(version=2), "version: 2"),
        (_state(domain="c.test"), "domain:"),
        (_state(_session(token=5)), "sessions[0].token"),
        (_state(_session(token="")), "sessions[0].token"),
        (_state(_session(runtimeURL="not an address")), "sessions[0].runtimeURL"),
        (_state(_session(), _session(token="t2")), "sessions[1].runtimeURL: a second session"),
        (
            _state(
                _session(addresses=["hyperty://b.test/1"]),
                _session(runtimeURL="hyperty-runtime://c.test/rt", bound=["hyperty://b.test/1"]),
            ),
            "sessions[1].bound: hyperty://b.test/1 belongs to two sessions",
        ),
        (_state(_session(addresses=["hyperty://b.test/1"], keys={"k": ["hyperty://b.test/2"]})), "sessions[0].keys.k"),
        (_state(_session(subscriptions={RESOURCE: []})), "sessions[0].subscriptions"),
        (_state(_session(buffer=[{}])), "sessions[0].buffer[0]: expected exactly one"),
        (_state(_session(buffer=[{"base64": "***"}])), "sessions[0].buffer[0].base64"),
        (_state(_session(buffer=[{"data": 1}])), "sessions[0].buffer[0].data"),
    ],
)
def test_a_bad_snapshot_is_refused_naming_the_field_and_loads_nothing(snapshot, words):
    node = Node()
    with pytest.raises(StateError) as caught:
        node.core.restore(snapshot, now=0.0)
    assert words in str(caught.value)
    assert node.core.session_count == 0 and node.core.address_count == 0


def test_restore_needs_an_empty_node(node):
    node.session("a")
    with pytest.raises(StateError, match="already has sessions"):
        node.core.restore(_state(), now=0.0)


def test_an_empty_snapshot_is_an_empty_node():
    node = Node()
    assert node.core.restore(_state(), now=0.0) == 0
    conn = node.connect("x")
    reply = only(node.send(conn, type="re-open", from_="hyperty-runtime://a.test/rt/t1", to=SESSION_URL))
    assert reply["body"]["code"] == 404


def test_connected_sessions_route_without_touching_buffers():
    """The hot path is unchanged: a connected target gets the received bytes, nothing is buffered."""
    node = Node()
    a, _ = node.session("a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    data = b'{"id":1,"type":"update","from":"hyperty-runtime://a.test/rt","to":"%s"}' % hb.encode()
    [action] = node.core.received(a, data)
    assert action.conn is b and action.data is data
    assert node.core.counters["buffered"] == 0
    reply = only(node.send(a, type="create", from_="x:y", to=ALLOC, body={}))
    assert reply["body"]["code"] == 200
