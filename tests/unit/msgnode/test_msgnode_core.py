"""The message node's protocol, driven without sockets: events in, actions out."""

from __future__ import annotations

import itertools
import json

import pytest

from protofly.message import Message
from protofly.msgnode.actions import CLOSE_SESSION_TAKEN_OVER, Close, CloseCode, EnableBatch, Send, SessionEnded
from protofly.msgnode.core import SESSION_URL, MessageNodeCore

D = "b.test"
ALLOC = f"domain://msg-node.{D}/address-allocation"
HYPERTY_ALLOC = f"domain://msg-node.{D}/hyperty-address-allocation"
OBJECT_ALLOC = f"domain://msg-node.{D}/object-address-allocation"
SM = f"domain://msg-node.{D}/sm"


class Conn:
    """A stand-in for the shell's connection object: the core only needs something hashable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Conn({self.name})"


def frame(**fields) -> bytes:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return json.dumps(fields).encode()


def sent(actions, conn=None) -> list[dict]:
    """The messages the actions send (to ``conn`` if given), decoded; arrays are not expected here."""
    return [json.loads(bytes(a.data)) for a in actions if isinstance(a, Send) and (conn is None or a.conn is conn)]


def only(actions, conn=None) -> dict:
    messages = sent(actions, conn)
    assert len(messages) == 1, messages
    return messages[0]


class Node:
    """A core plus helpers that open sessions and allocate like a stub would."""

    def __init__(self, **options) -> None:
        counter = itertools.count(1)
        options.setdefault("new_id", lambda: f"id{next(counter)}")
        self.core = MessageNodeCore(D, **options)
        self.ids = itertools.count(100)

    def connect(self, name: str) -> Conn:
        conn = Conn(name)
        assert self.core.connected(conn) == []
        return conn

    def send(self, conn: Conn, **fields) -> list:
        fields.setdefault("id", next(self.ids))
        return self.core.received(conn, frame(**fields))

    def open(self, conn: Conn, runtime: str, **body) -> dict:
        reply = only(self.send(conn, type="open", from_=runtime, to=SESSION_URL, body=body), conn)
        assert reply["body"]["code"] == 200, reply
        return reply

    def session(self, name: str, runtime: str | None = None) -> tuple[Conn, str]:
        conn = self.connect(name)
        runtime = runtime or f"hyperty-runtime://{name}.test/rt"
        token = self.open(conn, runtime)["body"]["runtimeToken"]
        return conn, f"{runtime}/{token}"

    def allocate(self, conn: Conn, to: str = ALLOC, **body) -> list[str]:
        reply = only(self.send(conn, type="create", from_="hyperty-runtime://x.test/rt/registry", to=to, body=body))
        assert reply["body"]["code"] == 200, reply
        return reply["body"]["value"]["allocated"]


@pytest.fixture
def node() -> Node:
    return Node()


# -- sessions ------------------------------------------------------------------------------------------


def test_open_answers_200_with_a_token_and_the_request_id_unchanged(node):
    conn = node.connect("a")
    actions = node.core.received(conn, frame(id=7, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL))
    reply = only(actions, conn)
    assert reply == {
        "id": 7,
        "type": "response",
        "from": SESSION_URL,
        "to": "hyperty-runtime://a.test/rt",
        "body": {"code": 200, "runtimeToken": "id1"},
    }
    session = node.core.session("hyperty-runtime://a.test/rt/id1")
    assert session is not None and session.conn is conn
    assert node.core.session_of(conn) is session


def test_string_ids_stay_strings_in_every_response(node):
    conn = node.connect("a")
    reply = only(node.send(conn, id="1", type="OPEN", from_="hyperty-runtime://a.test/rt", to=SESSION_URL))
    assert reply["id"] == "1"
    reply = only(node.send(conn, id="2", type="create", from_="hyperty-runtime://a.test/rt", to=ALLOC, body={}))
    assert reply["id"] == "2" and reply["body"]["code"] == 200
    reply = only(node.send(conn, id="3", type="read", from_="hyperty-runtime://a.test/rt", to="hyperty://z.test/0"))
    assert reply["id"] == "3" and reply["body"]["code"] == 404


def test_open_from_a_non_address_is_400(node):
    conn = node.connect("a")
    reply = only(node.send(conn, type="open", from_="not an address", to=SESSION_URL))
    assert reply["body"]["code"] == 400
    assert "from:" in reply["body"]["description"]
    assert node.core.session_count == 0


def test_repeated_open_on_the_same_connection_returns_the_same_session(node):
    conn = node.connect("a")
    first = node.open(conn, "hyperty-runtime://a.test/rt")
    second = node.open(conn, "hyperty-runtime://a.test/rt")
    assert first["body"]["runtimeToken"] == second["body"]["runtimeToken"]
    assert node.core.session_count == 1


def test_open_for_another_runtime_on_a_connection_with_a_session_is_409(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="open", from_="hyperty-runtime://other.test/rt", to=SESSION_URL))
    assert reply["body"]["code"] == 409
    assert node.core.session_count == 1


def test_open_while_the_runtime_has_a_connected_session_is_409(node):
    node.session("a", "hyperty-runtime://a.test/rt")
    other = node.connect("a2")
    reply = only(node.send(other, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL))
    assert reply["body"]["code"] == 409
    assert "re-open" in reply["body"]["description"]


def test_open_replaces_a_detached_session_of_the_same_runtime_and_frees_its_addresses(node):
    conn, url = node.session("a", "hyperty-runtime://a.test/rt")
    [address] = node.allocate(conn)
    node.core.disconnected(conn, now=0.0)
    fresh = node.connect("a2")
    actions = node.send(fresh, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL)
    ended = [a for a in actions if isinstance(a, SessionEnded)]
    assert [(e.url, e.reason, e.addresses) for e in ended] == [(url, "replaced", 1)]
    assert only(actions, fresh)["body"]["code"] == 200
    assert node.core.owner(address) is None
    assert node.core.session(url) is None


def test_reopen_after_a_socket_drop_keeps_addresses_and_rebinds(node):
    conn, url = node.session("a")
    [address] = node.allocate(conn)
    node.core.disconnected(conn, now=5.0)
    again = node.connect("a-again")
    reply = only(node.send(again, id=3, type="re-open", from_=url, to=SESSION_URL), again)
    assert reply["body"]["code"] == 200 and reply["id"] == 3
    assert reply["to"] == url
    assert node.core.owner(address).conn is again
    assert node.core.next_deadline() is None  # no expiry pending any more
    peer, _ = node.session("p")
    actions = node.send(peer, type="update", from_="hyperty-runtime://p.test/rt", to=address, body={})
    assert [a.conn for a in actions] == [again]


def test_reopen_with_an_unknown_token_is_404_naming_the_session(node):
    conn = node.connect("a")
    reply = only(node.send(conn, type="re-open", from_="hyperty-runtime://a.test/rt/nope", to=SESSION_URL))
    assert reply["body"]["code"] == 404
    assert "unknown session hyperty-runtime://a.test/rt/nope" in reply["body"]["description"]
    assert "open" in reply["body"]["description"]


def test_reopen_from_another_connection_takes_the_session_over(node):
    old, url = node.session("a")
    new = node.connect("a-new")
    actions = node.send(new, type="re-open", from_=url, to=SESSION_URL)
    assert only(actions, new)["body"]["code"] == 200
    closes = [a for a in actions if isinstance(a, Close)]
    assert [(c.conn, c.code) for c in closes] == [(old, CLOSE_SESSION_TAKEN_OVER)]
    assert node.core.session_of(old) is None
    # the old socket's late disconnect must not detach the session from its new connection
    assert node.core.disconnected(old, now=1.0) == []
    assert node.core.session(url).conn is new


def test_reopen_on_a_connection_carrying_another_session_is_409(node):
    _, url = node.session("a")
    other, _ = node.session("b")
    reply = only(node.send(other, type="re-open", from_=url, to=SESSION_URL))
    assert reply["body"]["code"] == 409


def test_close_frees_everything_and_closes_the_socket(node):
    conn, url = node.session("a")
    addresses = node.allocate(conn, value={"number": 3})
    node.send(
        conn,
        type="subscribe",
        from_="hyperty-runtime://a.test/rt/sm",
        to=SM,
        body={"resources": ["comm://x.test/room/changes"]},
    )
    actions = node.send(conn, id=9, type="close", from_=url, to=SESSION_URL)
    assert only(actions, conn)["body"] == {"code": 200}
    assert [(e.reason, e.addresses) for e in actions if isinstance(e, SessionEnded)] == [("closed", 3)]
    assert [(c.conn, c.code) for c in actions if isinstance(c, Close)] == [(conn, CloseCode.NORMAL_CLOSURE)]
    assert all(node.core.owner(a) is None for a in addresses)
    assert node.core.subscribers("comm://x.test/room/changes") == []
    assert node.core.session_count == 0
    assert node.core.counters["sessions_closed"] == 1


def test_close_without_a_session_is_404(node):
    conn = node.connect("a")
    reply = only(node.send(conn, type="close", from_="hyperty-runtime://a.test/rt/x", to=SESSION_URL))
    assert reply["body"]["code"] == 404


def test_close_from_outside_the_session_runtime_is_403(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="close", from_="hyperty-runtime://evil.test/rt", to=SESSION_URL))
    assert reply["body"]["code"] == 403
    assert node.core.session_count == 1


def test_other_types_to_the_session_manager_are_405(node):
    conn = node.connect("a")
    reply = only(node.send(conn, type="read", from_="hyperty-runtime://a.test/rt", to=SESSION_URL))
    assert reply["body"]["code"] == 405


def test_detached_session_expires_after_the_grace_period_and_frees_its_addresses():
    node = Node(session_grace=10.0)
    conn, url = node.session("a")
    [address] = node.allocate(conn)
    assert node.core.next_deadline() is None
    assert node.core.disconnected(conn, now=100.0) == []
    assert node.core.next_deadline() == 110.0
    assert node.core.tick(109.9) == []
    assert node.core.owner(address) is not None
    actions = node.core.tick(110.0)
    assert [(a.url, a.reason, a.addresses) for a in actions] == [(url, "expired", 1)]
    assert node.core.owner(address) is None
    assert node.core.next_deadline() is None
    again = node.connect("again")
    assert only(node.send(again, type="re-open", from_=url, to=SESSION_URL))["body"]["code"] == 404


def test_reopen_before_the_deadline_cancels_the_expiry():
    node = Node(session_grace=10.0)
    conn, url = node.session("a")
    node.core.disconnected(conn, now=0.0)
    again = node.connect("again")
    node.send(again, type="re-open", from_=url, to=SESSION_URL)
    assert node.core.tick(50.0) == []
    assert node.core.session(url) is not None
    # dropped again: a new, later deadline applies
    node.core.disconnected(again, now=60.0)
    assert node.core.next_deadline() == 70.0


def test_zero_grace_ends_the_session_with_the_socket():
    node = Node(session_grace=0)
    conn, url = node.session("a")
    actions = node.core.disconnected(conn, now=1.0)
    assert [(a.url, a.reason) for a in actions] == [(url, "expired")]


def test_messages_before_open_are_refused_with_403_and_responses_dropped(node):
    conn = node.connect("a")
    reply = only(node.send(conn, type="create", from_="hyperty-runtime://a.test/rt", to=ALLOC, body={}))
    assert reply["body"]["code"] == 403 and "open" in reply["body"]["description"]
    reply = only(node.send(conn, type="update", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={}))
    assert reply["body"]["code"] == 403
    assert (
        node.send(conn, type="response", from_="hyperty://a.test/x", to="hyperty://b.test/y", body={"code": 200}) == []
    )
    assert node.core.counters["responses_dropped"] == 1


def test_session_types_to_other_destinations_are_400(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="open", from_="hyperty-runtime://a.test/rt", to="hyperty://b.test/x"))
    assert reply["body"]["code"] == 400


# -- authentication ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [({}, 401), ({"accessToken": "wrong"}, 403), ({"accessToken": 5}, 400), ({"accessToken": "s3cret"}, 200)],
)
def test_open_with_auth_on(body, code):
    node = Node(auth_tokens=["other", "s3cret"])
    conn = node.connect("a")
    reply = only(node.send(conn, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL, body=body))
    assert reply["body"]["code"] == code
    assert (node.core.session_count == 1) is (code == 200)
    assert "s3cret" not in json.dumps(reply)


def test_reopen_needs_no_access_token_the_runtime_token_is_the_credential():
    node = Node(auth_tokens=["s3cret"])
    conn = node.connect("a")
    node.open(conn, "hyperty-runtime://a.test/rt", accessToken="s3cret")
    node.core.disconnected(conn, now=0.0)
    again = node.connect("again")
    reply = only(node.send(again, type="re-open", from_="hyperty-runtime://a.test/rt/id1", to=SESSION_URL))
    assert reply["body"]["code"] == 200


# -- batching ------------------------------------------------------------------------------------------


def test_batch_is_granted_in_the_200_and_enabled_after_it(node):
    conn = node.connect("a")
    actions = node.send(conn, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL, body={"batch": True})
    assert [type(a) for a in actions] == [Send, EnableBatch]
    reply = json.loads(actions[0].data)
    assert reply["body"]["batch"] is True and reply["body"]["maxFrame"] == node.core.max_frame


def test_no_batch_unless_asked(node):
    conn = node.connect("a")
    actions = node.send(conn, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL)
    assert [type(a) for a in actions] == [Send]
    assert "batch" not in json.loads(actions[0].data)["body"]


def test_a_batch_connection_may_send_arrays_each_element_routed_or_answered_alone(node):
    conn = node.connect("a")
    node.open(conn, "hyperty-runtime://a.test/rt", batch=True)
    [mine] = node.allocate(conn)
    peer, _ = node.session("p")
    [theirs] = node.allocate(peer)
    batch = (
        b' [{"id":1,"type":"update","from":"%s","to":"%s","body":{"n":1}},'
        b'{"id":2,"type":"bo gus","from":"%s","to":"%s"},'
        b'{"id":3,"type":"update","from":"%s","to":"%s","body":{"n":3}}]' % ((mine.encode(), theirs.encode()) * 3)
    )
    actions = node.core.received(conn, batch)
    assert [m["body"]["n"] for m in sent(actions, peer)] == [1, 3]
    [error] = sent(actions, conn)
    assert error["id"] == 2 and error["body"]["code"] == 400 and "type" in error["body"]["description"]
    # forwarded elements are the exact bytes of the array element, not a re-encoding
    forwarded = [bytes(a.data) for a in actions if a.conn is peer]
    assert forwarded[0] == b'{"id":1,"type":"update","from":"%s","to":"%s","body":{"n":1}}' % (
        mine.encode(),
        theirs.encode(),
    )


def test_an_array_from_a_connection_without_batch_closes_it_1007(node):
    conn, _ = node.session("a")
    actions = node.core.received(conn, b'[{"type":"update","from":"a:b","to":"c:d"}]')
    assert [(type(a), a.code) for a in actions] == [(Close, CloseCode.INVALID_DATA)]


def test_a_broken_array_from_a_batch_connection_closes_it_1007(node):
    conn = node.connect("a")
    node.open(conn, "hyperty-runtime://a.test/rt", batch=True)
    actions = node.core.received(conn, b"[{},")
    assert [(type(a), a.code) for a in actions] == [(Close, CloseCode.INVALID_DATA)]


# -- address allocation --------------------------------------------------------------------------------


def test_single_allocation_defaults_to_one_hyperty_address(node):
    conn, _ = node.session("a")
    reply = only(
        node.send(conn, id=1, type="create", from_="hyperty-runtime://a.test/rt/registry", to=ALLOC, body={"value": {}})
    )
    assert reply == {
        "id": 1,
        "type": "response",
        "from": ALLOC,
        "to": "hyperty-runtime://a.test/rt/registry",
        "body": {"code": 200, "value": {"allocated": ["hyperty://b.test/id2"]}},
    }
    assert node.core.owner("hyperty://b.test/id2") is node.core.session_of(conn)


def test_block_allocation_returns_distinct_addresses(node):
    conn, _ = node.session("a")
    addresses = node.allocate(conn, HYPERTY_ALLOC, value={"number": 5})
    assert len(set(addresses)) == 5
    assert all(a.startswith("hyperty://b.test/") for a in addresses)


def test_allocated_addresses_are_uuids_by_default():
    core = MessageNodeCore(D)
    conn = Conn("a")
    core.connected(conn)
    core.received(conn, frame(id=1, type="open", from_="hyperty-runtime://a.test/rt", to=SESSION_URL))
    [reply] = sent(core.received(conn, frame(id=2, type="create", from_="x:y", to=ALLOC, body={})))
    [address] = reply["body"]["value"]["allocated"]
    prefix, _, tail = address.rpartition("/")
    assert prefix == "hyperty://b.test" and len(tail) == 36 and tail.count("-") == 4


def test_hyperty_endpoint_ignores_the_scheme(node):
    conn, _ = node.session("a")
    [address] = node.allocate(conn, HYPERTY_ALLOC, scheme="comm", value={"number": 1})
    assert address.startswith("hyperty://b.test/")


def test_object_allocation_honours_the_scheme(node):
    conn, _ = node.session("a")
    addresses = node.allocate(conn, OBJECT_ALLOC, scheme="comm", value={"number": 2})
    assert [a.rpartition("/")[0] for a in addresses] == ["comm://b.test", "comm://b.test"]


def test_generic_allocation_honours_the_scheme_and_defaults_to_hyperty(node):
    conn, _ = node.session("a")
    assert node.allocate(conn, ALLOC, scheme="ctxt")[0].startswith("ctxt://b.test/")
    assert node.allocate(conn, ALLOC)[0].startswith("hyperty://b.test/")


def test_object_allocation_without_a_scheme_is_400(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="create", from_="x:y", to=OBJECT_ALLOC, body={"value": {"number": 1}}))
    assert reply["body"]["code"] == 400 and "body.scheme" in reply["body"]["description"]


@pytest.mark.parametrize("scheme", ["hyperty-runtime", "domain", "domain-idp", "mn", "Not A Scheme", 5])
def test_reserved_or_malformed_schemes_are_400(node, scheme):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="create", from_="x:y", to=OBJECT_ALLOC, body={"scheme": scheme}))
    assert reply["body"]["code"] == 400 and "body.scheme" in reply["body"]["description"]


def test_a_flat_body_is_accepted_too(node):
    conn, _ = node.session("a")
    assert len(node.allocate(conn, ALLOC, number=3, scheme="comm")) == 3


@pytest.mark.parametrize("number", [0, -1, "5", 1.5, True, 1001])
def test_bad_numbers_are_400(node, number):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="create", from_="x:y", to=ALLOC, body={"value": {"number": number}}))
    assert reply["body"]["code"] == 400 and "number" in reply["body"]["description"]
    assert node.core.address_count == 0


def test_body_value_must_be_an_object(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="create", from_="x:y", to=ALLOC, body={"value": [1]}))
    assert reply["body"]["code"] == 400 and "body.value" in reply["body"]["description"]


def test_the_per_session_address_limit_is_enforced():
    node = Node(max_addresses=6)
    conn, _ = node.session("a")
    node.allocate(conn, value={"number": 5})
    reply = only(node.send(conn, type="create", from_="x:y", to=ALLOC, body={"value": {"number": 2}}))
    assert reply["body"]["code"] == 403
    assert node.core.address_count == 5


def test_allocation_key_then_delete_by_key(node):
    conn, _ = node.session("a")
    reply = only(
        node.send(conn, type="create", from_="x:y", to=ALLOC, body={"value": {"number": 3, "allocationKey": "block-1"}})
    )
    block = reply["body"]["value"]["allocated"]
    assert reply["body"]["value"]["allocationKey"] == "block-1"
    [other] = node.allocate(conn)
    reply = only(node.send(conn, type="delete", from_="x:y", to=ALLOC, body={"resource": "block-1"}))
    assert reply["body"]["code"] == 200
    assert sorted(reply["body"]["value"]["deallocated"]) == sorted(block)
    assert all(node.core.owner(a) is None for a in block)
    assert node.core.owner(other) is not None
    reply = only(node.send(conn, type="delete", from_="x:y", to=ALLOC, body={"resource": "block-1"}))
    assert reply["body"]["code"] == 404


def test_delete_by_children_resources(node):
    conn, _ = node.session("a")
    addresses = node.allocate(conn, HYPERTY_ALLOC, value={"number": 3, "allocationKey": "k"})
    reply = only(
        node.send(conn, type="delete", from_="x:y", to=HYPERTY_ALLOC, body={"childrenResources": addresses[:2]})
    )
    assert reply["body"]["code"] == 200
    assert [node.core.owner(a) is None for a in addresses] == [True, True, False]
    # the key now covers only what is left of its block
    reply = only(node.send(conn, type="delete", from_="x:y", to=HYPERTY_ALLOC, body={"resource": "k"}))
    assert reply["body"]["value"]["deallocated"] == addresses[2:]


def test_delete_by_a_single_address_resource_as_vertx_does(node):
    conn, _ = node.session("a")
    [address] = node.allocate(conn)
    reply = only(node.send(conn, type="delete", from_="x:y", to=ALLOC, body={"resource": address}))
    assert reply["body"]["code"] == 200 and node.core.owner(address) is None


def test_delete_of_an_address_that_is_not_ours_frees_nothing_and_is_404(node):
    conn, _ = node.session("a")
    mine = node.allocate(conn)
    other, _ = node.session("b")
    [theirs] = node.allocate(other)
    reply = only(node.send(conn, type="delete", from_="x:y", to=ALLOC, body={"childrenResources": [*mine, theirs]}))
    assert reply["body"]["code"] == 404 and theirs in reply["body"]["description"]
    assert node.core.owner(mine[0]) is not None and node.core.owner(theirs) is not None


@pytest.mark.parametrize("body", [{}, {"resource": 5}, {"childrenResources": "x"}, {"childrenResources": [1]}])
def test_malformed_deletes_are_400(node, body):
    conn, _ = node.session("a")
    node.allocate(conn)
    reply = only(node.send(conn, type="delete", from_="x:y", to=ALLOC, body=body))
    assert reply["body"]["code"] == 400
    assert node.core.address_count == 1


def test_other_types_to_allocation_are_405(node):
    conn, _ = node.session("a")
    reply = only(node.send(conn, type="update", from_="x:y", to=ALLOC, body={}))
    assert reply["body"]["code"] == 405


# -- subscriptions -------------------------------------------------------------------------------------


RESOURCE = "comm://a.test/room/changes"


@pytest.mark.parametrize("key", ["resources", "subscribe"])
def test_subscribe_with_either_list_key_and_updates_reach_every_subscriber(node, key):
    publisher, _ = node.session("pub")
    subscribers = []
    for name in ("s1", "s2", "s3"):
        conn, _ = node.session(name)
        reply = only(
            node.send(
                conn,
                id=1,
                type="subscribe",
                from_=f"hyperty-runtime://{name}.test/rt/sm",
                to=SM,
                body={key: [RESOURCE]},
            )
        )
        assert reply == {
            "id": 1,
            "type": "response",
            "from": SM,
            "to": f"hyperty-runtime://{name}.test/rt/sm",
            "body": {"code": 200},
        }
        subscribers.append(conn)
    actions = node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={"value": 1})
    assert [a.conn for a in actions] == subscribers
    assert len({id(a.data) for a in actions}) == 1  # one encoding (here: the received bytes) for all
    assert node.core.counters["fanout_deliveries"] == 3


def test_a_single_string_is_accepted_as_a_list(node):
    conn, _ = node.session("s")
    node.send(conn, type="subscribe", from_="x:y", to=SM, body={"subscribe": RESOURCE})
    assert len(node.core.subscribers(RESOURCE)) == 1


def test_subscriptions_with_source_count_per_source_and_deliver_once_per_session(node):
    conn, _ = node.session("s")
    for source in ("hyperty://s.test/h1", "hyperty://s.test/h2"):
        node.send(
            conn,
            type="subscribe",
            from_="hyperty-runtime://s.test/rt/sm",
            to=SM,
            body={"resources": [RESOURCE], "source": source},
        )
    publisher, _ = node.session("pub")
    assert len(node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={})) == 1
    node.send(
        conn,
        type="unsubscribe",
        from_="hyperty-runtime://s.test/rt/sm",
        to=SM,
        body={"resources": [RESOURCE], "source": "hyperty://s.test/h1"},
    )
    assert len(node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={})) == 1
    node.send(
        conn,
        type="unsubscribe",
        from_="hyperty-runtime://s.test/rt/sm",
        to=SM,
        body={"unsubscribe": [RESOURCE], "source": "hyperty://s.test/h2"},
    )
    reply = only(node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={}))
    assert reply["body"]["code"] == 404


def test_unsubscribe_without_source_stops_delivery_to_the_session(node):
    conn, _ = node.session("s")
    node.send(conn, type="subscribe", from_="hyperty://s.test/h1", to=SM, body={"resources": [RESOURCE]})
    node.send(conn, type="subscribe", from_="hyperty://s.test/h2", to=SM, body={"resources": [RESOURCE]})
    reply = only(
        node.send(
            conn, type="unsubscribe", from_="hyperty-runtime://s.test/rt/sm", to=SM, body={"resources": [RESOURCE]}
        )
    )
    assert reply["body"]["code"] == 200
    assert node.core.subscribers(RESOURCE) == []
    assert node.core.session_of(conn).subscription_count == 0


def test_subscription_matching_is_exact(node):
    conn, _ = node.session("s")
    node.send(conn, type="subscribe", from_="x:y", to=SM, body={"resources": ["comm://a.test/room"]})
    publisher, _ = node.session("pub")
    reply = only(node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={}))
    assert reply["body"]["code"] == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.resources"),
        ({"resources": 5}, "body.resources"),
        ({"subscribe": [5]}, "body.subscribe"),
        ({"resources": ["no scheme"]}, "body.resources"),
        ({"resources": [RESOURCE], "source": 3}, "body.source"),
    ],
)
def test_malformed_subscriptions_are_400_naming_the_field(node, body, field):
    conn, _ = node.session("s")
    reply = only(node.send(conn, type="subscribe", from_="x:y", to=SM, body=body))
    assert reply["body"]["code"] == 400
    assert reply["body"]["description"].startswith(field)
    assert node.core.subscribers(RESOURCE) == []


def test_the_per_session_subscription_limit_is_enforced():
    node = Node(max_subscriptions=2)
    conn, _ = node.session("s")
    node.send(conn, type="subscribe", from_="x:y", to=SM, body={"resources": ["comm://a.test/1", "comm://a.test/2"]})
    reply = only(node.send(conn, type="subscribe", from_="x:y", to=SM, body={"resources": ["comm://a.test/3"]}))
    assert reply["body"]["code"] == 403
    assert node.core.subscribers("comm://a.test/3") == []


def test_other_types_to_sm_are_405(node):
    conn, _ = node.session("s")
    assert only(node.send(conn, type="read", from_="x:y", to=SM))["body"]["code"] == 405


def test_fan_out_writes_to_connected_subscribers_and_buffers_for_detached_ones(node):
    alive, _ = node.session("s1")
    gone, url = node.session("s2")
    for conn in (alive, gone):
        node.send(conn, type="subscribe", from_="x:y", to=SM, body={"resources": [RESOURCE]})
    node.core.disconnected(gone, now=0.0)
    publisher, _ = node.session("pub")
    actions = node.send(publisher, type="update", from_="comm://a.test/room", to=RESOURCE, body={})
    assert [a.conn for a in actions] == [alive]
    assert node.core.counters["buffered"] == 1
    assert [json.loads(data)["to"] for data in node.core.session(url).buffer] == [RESOURCE]


# -- routing -------------------------------------------------------------------------------------------


def test_point_to_point_forwards_the_received_bytes_unchanged(node):
    a, _ = node.session("a")
    b, _ = node.session("b")
    [ha] = node.allocate(a)
    [hb] = node.allocate(b)
    data = b'{"id":"7","type":"UPDATE","from":"%s","to":["%s"],"body":{"x":[1,2]}}' % (ha.encode(), hb.encode())
    [action] = node.core.received(a, data)
    assert action.conn is b and action.data is data


def test_ping_and_pong_between_two_sessions(node):
    a, _ = node.session("a")
    b, _ = node.session("b")
    [ha] = node.allocate(a)
    [hb] = node.allocate(b)
    ping = node.send(a, id=1, type="execute", from_=ha, to=hb, body={"method": "ping"})
    assert [x.conn for x in ping] == [b]
    pong = node.send(b, id=1, type="response", from_=hb, to=ha, body={"code": 200, "value": "pong"})
    assert [x.conn for x in pong] == [a]


def test_already_decoded_messages_are_encoded_once(node):
    a, _ = node.session("a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    [action] = node.core.received(a, Message(id=1, type="update", from_="hyperty-runtime://a.test/rt", to=hb))
    assert action.conn is b and json.loads(action.data)["to"] == hb


def test_runtime_urls_and_paths_below_them_route_to_their_session(node):
    a, url = node.session("a", "hyperty-runtime://a.test/rt")
    b, _ = node.session("b")
    for to in (
        "hyperty-runtime://a.test/rt",
        "hyperty-runtime://a.test/rt/sm",
        url,
        "hyperty-runtime://a.test/rt/registry/x",
    ):
        actions = node.send(b, type="update", from_="hyperty-runtime://b.test/rt", to=to, body={})
        assert [x.conn for x in actions] == [a], to
    reply = only(node.send(b, type="update", from_="hyperty-runtime://b.test/rt", to="hyperty-runtime://a.test/rtX"))
    assert reply["body"]["code"] == 404


def test_unknown_destination_is_404_with_a_description(node):
    a, _ = node.session("a")
    reply = only(node.send(a, id=4, type="read", from_="hyperty-runtime://a.test/rt", to="hyperty://b.test/ghost"))
    assert reply["id"] == 4 and reply["from"] == "hyperty://b.test/ghost"
    assert reply["body"]["code"] == 404 and "hyperty://b.test/ghost" in reply["body"]["description"]
    assert node.core.counters["not_found"] == 1


def test_unknown_node_component_is_404(node):
    a, _ = node.session("a")
    reply = only(node.send(a, type="read", from_="x:y", to=f"domain://msg-node.{D}/nothing-here"))
    assert reply["body"]["code"] == 404 and "component" in reply["body"]["description"]


def test_a_response_to_an_unknown_destination_is_dropped_and_counted(node):
    a, _ = node.session("a")
    assert node.send(a, type="response", from_="x:y", to="hyperty://b.test/ghost", body={"code": 200}) == []
    assert node.core.counters["responses_dropped"] == 1


@pytest.mark.parametrize(
    "to",
    [
        f"domain://registry.{D}",
        f"domain://registry.{D}/",
        f"domain://registry.{D}/x",
        "global://registry",
        "global://registry/",
    ],
)
def test_registries_answer_501(node, to):
    a, _ = node.session("a")
    reply = only(node.send(a, type="read", from_="hyperty-runtime://a.test/rt/registry", to=to))
    assert reply["body"]["code"] == 501 and "registry" in reply["body"]["description"]


def test_a_message_to_a_detached_session_is_buffered_not_refused(node):
    a, _ = node.session("a")
    b, url = node.session("b")
    [hb] = node.allocate(b)
    node.core.disconnected(b, now=0.0)
    assert node.send(a, type="update", from_="x:y", to=hb, body={}) == []
    assert node.send(a, type="response", from_="x:y", to=hb, body={"code": 200}) == []
    assert len(node.core.session(url).buffer) == 2


# -- inter-domain replies (transition binding) ---------------------------------------------------------


def test_a_foreign_hyperty_is_bound_to_its_session_so_the_reply_finds_it(node):
    foreign, _ = node.session("a", "hyperty-runtime://a.test/rt")
    local, _ = node.session("b")
    [hb] = node.allocate(local)
    actions = node.send(foreign, id=1, type="execute", from_="hyperty://a.test/x", to=hb, body={"method": "ping"})
    assert [x.conn for x in actions] == [local]
    assert node.core.owner("hyperty://a.test/x") is node.core.session_of(foreign)
    reply = node.send(local, id=1, type="response", from_=hb, to="hyperty://a.test/x", body={"code": 200})
    assert [x.conn for x in reply] == [foreign]


def test_runtime_senders_are_not_bound(node):
    a, _ = node.session("a")
    node.send(a, type="update", from_="hyperty-runtime://other.test/rt", to="hyperty://b.test/x", body={})
    assert node.core.owner("hyperty-runtime://other.test/rt") is None
    assert node.core.counters["bound"] == 0


def test_bound_addresses_are_capped_least_recently_used_first():
    node = Node(max_bound=2)
    a, _ = node.session("a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    for name in ("h1", "h2"):
        node.send(a, type="update", from_=f"hyperty://a.test/{name}", to=hb, body={})
    node.send(a, type="update", from_="hyperty://a.test/h1", to=hb, body={})  # h1 is now the most recent
    node.send(a, type="update", from_="hyperty://a.test/h3", to=hb, body={})
    assert node.core.owner("hyperty://a.test/h2") is None
    assert node.core.owner("hyperty://a.test/h1") is not None
    assert node.core.owner("hyperty://a.test/h3") is not None
    assert node.core.counters["bound_evicted"] == 1
    assert len(node.core.session_of(a).bound) == 2


def test_a_foreign_address_moves_to_the_session_that_last_spoke_for_it(node):
    a1, _ = node.session("a1")
    a2, _ = node.session("a2")
    node.send(a1, type="update", from_="hyperty://a.test/x", to="hyperty-runtime://a2.test/rt", body={})
    node.send(a2, type="update", from_="hyperty://a.test/x", to="hyperty-runtime://a1.test/rt", body={})
    assert node.core.owner("hyperty://a.test/x") is node.core.session_of(a2)
    assert "hyperty://a.test/x" not in node.core.session_of(a1).bound


def test_sending_as_an_address_allocated_to_another_session_is_403(node):
    a, _ = node.session("a")
    b, _ = node.session("b")
    [hb] = node.allocate(b)
    reply = only(node.send(a, type="update", from_=hb, to="hyperty-runtime://b.test/rt", body={}))
    assert reply["body"]["code"] == 403 and hb in reply["body"]["description"]


def test_bound_addresses_are_freed_with_their_session():
    node = Node(session_grace=1.0)
    a, _ = node.session("a")
    node.send(a, type="update", from_="hyperty://a.test/x", to="hyperty://b.test/none", body={})
    node.core.disconnected(a, now=0.0)
    [ended] = node.core.tick(1.0)
    assert ended.addresses == 1 and node.core.owner("hyperty://a.test/x") is None


# -- validation ----------------------------------------------------------------------------------------


def test_invalid_json_closes_1007(node):
    conn, _ = node.session("a")
    [action] = node.core.received(conn, b"{not json")
    assert isinstance(action, Close) and action.code == CloseCode.INVALID_DATA
    assert "json" in action.reason
    assert node.core.counters["invalid"] == 1


def test_a_message_without_from_closes_1007(node):
    conn, _ = node.session("a")
    [action] = node.core.received(conn, b'{"id":1,"type":"update","to":"hyperty://b.test/x"}')
    assert isinstance(action, Close) and action.code == CloseCode.INVALID_DATA and "from" in action.reason


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"id":5,"type":"update","from":"hyperty://a.test/x"}', "to"),
        (b'{"id":"5","type":"frob nicate","from":"hyperty://a.test/x","to":"hyperty://b.test/y"}', "type"),
        (b'{"id":5,"from":"hyperty://a.test/x","to":"hyperty://b.test/y"}', "type"),
        (b'{"id":5,"type":"update","from":"hyperty://a.test/x","to":"hyperty://b.test/y","body":[1]}', "body"),
    ],
)
def test_an_invalid_message_with_a_sender_gets_400_naming_the_field(node, data, field):
    conn, _ = node.session("a")
    reply = only(node.core.received(conn, data))
    assert reply["type"] == "response" and reply["to"] == "hyperty://a.test/x"
    assert reply["id"] == json.loads(data)["id"]
    assert reply["body"]["code"] == 400 and reply["body"]["description"].startswith(field)


def test_an_invalid_response_is_dropped_not_answered(node):
    conn, _ = node.session("a")
    assert node.core.received(conn, b'{"id":5,"type":"response","from":"hyperty://a.test/x"}') == []
    assert node.core.counters["responses_dropped"] == 1


def test_a_frame_over_the_limit_closes_1009():
    node = Node(max_frame=100)
    conn = node.connect("a")
    [action] = node.core.received(conn, b"{" + b" " * 200 + b"}")
    assert isinstance(action, Close) and action.code == CloseCode.MESSAGE_TOO_BIG


def test_binary_frames_close_1003(node):
    conn, _ = node.session("a")
    [action] = node.core.received_binary(conn)
    assert action.code == CloseCode.UNSUPPORTED_DATA


def test_text_frames_given_as_str_work(node):
    conn = node.connect("a")
    [action] = node.core.received(conn, '{"id":1,"type":"open","from":"hyperty-runtime://a.test/é","to":"mn:/session"}')
    assert json.loads(action.data)["body"]["code"] == 200


def test_close_reasons_fit_in_a_close_frame(node):
    conn, _ = node.session("a")
    [action] = node.core.received(conn, b'{"type":"update","from":' + b'"x' * 300)
    assert len(action.reason.encode()) <= 123


def test_disconnect_of_an_unknown_connection_is_harmless(node):
    assert node.core.disconnected(Conn("never"), now=0.0) == []


def test_frames_after_a_close_are_ignored_until_the_socket_goes(node):
    conn, _ = node.session("a")
    [close] = node.core.received(conn, b"{broken")
    assert isinstance(close, Close)
    assert node.send(conn, type="read", from_="hyperty-runtime://a.test/rt", to="hyperty://b.test/x") == []
    assert node.core.received_binary(conn) == []
    assert node.core.counters["ignored_after_close"] == 2


def test_a_batch_stops_at_the_element_that_closes_the_connection(node):
    conn = node.connect("a")
    node.open(conn, "hyperty-runtime://a.test/rt", batch=True)
    actions = node.core.received(conn, b'[{"type":"read","to":"x:y"},{"id":1,"type":"read","from":"a:b","to":"x:y"}]')
    assert [type(a) for a in actions] == [Close]
