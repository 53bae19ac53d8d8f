"""Acknowledged delivery and durable state in the node core, without sockets: numbered frames in, actions out."""

from __future__ import annotations

import json

import msgspec
import pytest
from tests.unit.msgnode.test_msgnode_core import ALLOC, Node, frame, sent

from protofly.msgnode import acks
from protofly.msgnode.actions import Ack, Replay, Send
from protofly.msgnode.core import SESSION_URL, MessageNodeCore
from protofly.msgnode.journal import Journal, read_records


def numbered(seq: int, *messages: dict) -> bytes:
    return b"[%d," % seq + b",".join(json.dumps(m).encode() for m in messages) + b"]"


def update(n: int, sender: str, to: str) -> dict:
    return {"id": n, "type": "update", "from": sender, "to": to, "body": {"n": n}}


def to_conn(actions, conn) -> list[bytes]:
    return [bytes(a.data) for a in actions if isinstance(a, Send) and a.conn is conn]


class AckPair:
    """Two ack sessions on one node: ``a`` sends to the hyperty address ``b`` allocated."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.a = node.connect("a")
        reply = node.open(self.a, "hyperty-runtime://a.test/rt", ack=True)
        assert reply["body"]["ack"] is True and reply["body"]["received"] == 0
        self.a_url = "hyperty-runtime://a.test/rt/" + reply["body"]["runtimeToken"]
        self.b = node.connect("b")
        reply = node.open(self.b, "hyperty-runtime://b.test/rt", ack=True)
        self.b_url = "hyperty-runtime://b.test/rt/" + reply["body"]["runtimeToken"]
        [self.target] = node.allocate(self.b, scheme="hyperty", value={"number": 1})
        self.sender = "hyperty://a.test/sender"

    def send(self, seq: int, *ns: int) -> list:
        return self.node.core.received(self.a, numbered(seq, *(update(n, self.sender, self.target) for n in ns)))


@pytest.fixture
def node() -> Node:
    return Node()


@pytest.fixture
def pair(node) -> AckPair:
    return AckPair(node)


def test_open_without_ack_is_the_plain_protocol(node) -> None:
    conn = node.connect("plain")
    reply = node.open(conn, "hyperty-runtime://p.test/rt")
    assert "ack" not in reply["body"] and "received" not in reply["body"]


def test_numbered_messages_are_routed_numbered_and_acknowledged(pair) -> None:
    actions = pair.send(1, 1, 2)
    assert to_conn(actions, pair.b) == [
        acks.frame(1, json.dumps(update(1, pair.sender, pair.target)).encode()),
        acks.frame(2, json.dumps(update(2, pair.sender, pair.target)).encode()),
    ]
    [ack] = [json.loads(d) for d in to_conn(actions, pair.a)]
    assert ack == {"type": "update", "from": SESSION_URL, "to": pair.a_url, "body": {"ack": 2}}


def test_a_duplicate_is_dropped_and_acknowledged_again(pair) -> None:
    pair.send(1, 1, 2)
    actions = pair.send(2, 2, 3)  # 2 again (a re-send after a lost ack), then 3
    delivered = [json.loads(d)[1]["body"]["n"] for d in to_conn(actions, pair.b)]
    assert delivered == [3]
    assert json.loads(to_conn(actions, pair.a)[0])["body"] == {"ack": 3}
    assert pair.node.core.counters["duplicates"] == 1


def test_unacknowledged_messages_are_replayed_after_a_re_open_from_what_the_runtime_has(pair) -> None:
    core = pair.node.core
    pair.send(1, 1, 2, 3)
    core.received(pair.b, frame(type="update", from_=pair.b_url, to=SESSION_URL, body={"ack": 1}))
    assert [seq for seq, _ in core.session(pair.b_url).numbered()] == [2, 3]
    core.disconnected(pair.b, now=0.0)
    pair.send(4, 4)  # detached: kept, numbered, not sent
    b2 = pair.node.connect("b2")
    actions = core.received(
        b2, frame(id=9, type="re-open", from_=pair.b_url, to=SESSION_URL, body={"ack": True, "received": 2})
    )
    [answer] = [json.loads(d) for d in to_conn(actions, b2)]
    assert answer["body"]["code"] == 200 and answer["body"]["received"] == 0  # b never sent a numbered frame
    [replay] = [a for a in actions if isinstance(a, Replay)]
    assert [json.loads(f)[0] for f in replay.frames] == [3, 4]  # 2 was received by the runtime already


def test_a_full_window_answers_the_sender_503_never_silently(pair) -> None:
    node = Node(buffer_messages=2)
    small = AckPair(node)
    actions = small.send(1, 1, 2, 3)
    answers = [json.loads(d) for d in to_conn(actions, small.a) if b'"response"' in d]
    assert [(a["id"], a["body"]["code"]) for a in answers] == [(3, 503)]
    assert len(to_conn(actions, small.b)) == 2


def test_a_plain_client_taking_an_ack_session_over_gets_the_unacknowledged_messages_plain(pair) -> None:
    core = pair.node.core
    core.disconnected(pair.b, now=0.0)
    pair.send(1, 1, 2)
    plain = pair.node.connect("plain")
    actions = core.received(plain, frame(id=9, type="re-open", from_=pair.b_url, to=SESSION_URL))
    [replay] = [a for a in actions if isinstance(a, Replay)]
    assert [json.loads(f)["body"]["n"] for f in replay.frames] == [1, 2]
    assert core.session(pair.b_url).ack is False and not core.session(pair.b_url).unacked


def test_a_numbered_frame_before_open_closes_the_connection(node) -> None:
    conn = node.connect("early")
    node.core.manager.state(conn).ack = True
    actions = node.core.received(conn, numbered(1, update(1, "hyperty://x.test/a", "hyperty://b.test/b")))
    assert [type(a).__name__ for a in actions] == ["Close"]


def test_slow_plain_consumer_is_detached_and_what_it_did_not_get_is_buffered_or_answered() -> None:
    node = Node(buffer_messages=1)
    sender = node.connect("sender")
    node.open(sender, "hyperty-runtime://s.test/rt")
    reader = node.connect("reader")
    reply = node.open(reader, "hyperty-runtime://r.test/rt")
    url = "hyperty-runtime://r.test/rt/" + reply["body"]["runtimeToken"]
    pending = [json.dumps(update(n, "hyperty-runtime://s.test/rt/h", url + "/h")).encode() for n in (1, 2)]
    actions = node.core.slow_consumer(reader, pending, now=0.0)
    session = node.core.session(url)
    assert session.conn is None and session.buffer == [pending[0]]
    [answer] = sent(actions, sender)
    assert answer["id"] == 2 and answer["body"]["code"] == 503


# -- durable state: journal records, checkpoint and replay ------------------------------------------------


def test_journal_replays_onto_a_checkpoint_into_an_equal_state(tmp_path) -> None:
    node = Node(journal=True)
    pair = AckPair(node)
    core = node.core
    checkpoint = core.snapshot()
    assert ("x",) in core.take_journal()  # sessions and the allocation changed the structure
    pair.send(1, 1, 2, 3)
    core.received(pair.b, frame(type="update", from_=pair.b_url, to=SESSION_URL, body={"ack": 1}))
    journal = Journal(tmp_path)
    journal.open()
    taken = core.take_journal()
    assert [r[0] for r in taken] == ["x", "q", "q", "q", "r", "a"]  # x: the sender was bound on the fly
    assert journal.append(taken) is False and journal.size == 0  # a structural change: a checkpoint's job
    assert journal.append(taken[1:]) is True
    journal.close()
    snapshot, records = Journal(tmp_path).load()
    assert snapshot is None  # no checkpoint written by this test
    assert [r[:3] for r in records] == [["q", pair.b_url, 1], ["r", pair.a_url, 3], ["a", pair.b_url, 1]]
    assert [m["body"]["n"] for m in records[0][3:]] == [1, 2, 3]  # consecutive numbers: one record

    restored = MessageNodeCore("b.test", journal=True)
    restored.restore(checkpoint, now=0.0)
    assert restored.apply_journal(records) == 5
    assert restored.apply_journal(records) == 0  # idempotent: a record twice changes nothing
    b = restored.session(pair.b_url)
    assert [seq for seq, _ in b.numbered()] == [2, 3] and b.sent == 3 and b.ack is True
    assert json.loads(b.unacked[0])["body"]["n"] == 2
    assert restored.session(pair.a_url).received == 1 + 2  # the frame numbered 1 carried three messages
    # and it survives a checkpoint of its own
    again = MessageNodeCore("b.test")
    again.restore(msgspec.json.decode(msgspec.json.encode(restored.snapshot())), now=0.0)
    assert [seq for seq, _ in again.session(pair.b_url).numbered()] == [2, 3]


def test_a_torn_journal_tail_is_ignored() -> None:
    good = b'7\n["a",1]\n'
    assert read_records(good + b'12\n["q",') == [["a", 1]]
    assert read_records(good + b"x\n") == [["a", 1]]


# -- re-claiming addresses on a new session (a node that lost its state) ------------------------------------


def reclaim(node: Node, conn, addresses, **value) -> dict:
    body = {"scheme": "hyperty", "value": {"number": 1, "addresses": addresses, **value}}
    [answer] = sent(node.send(conn, type="create", from_="hyperty-runtime://x.test/rt/registry", to=ALLOC, body=body))
    return answer["body"]


def test_a_free_address_is_granted_again_under_its_allocation_key(node) -> None:
    conn, url = node.session("a")
    body = reclaim(node, conn, ["hyperty://b.test/old-1"], allocationKey="k1")
    assert body["code"] == 200 and body["value"] == {"allocated": ["hyperty://b.test/old-1"], "allocationKey": "k1"}
    assert node.core.owner("hyperty://b.test/old-1") is node.core.session(url)


def test_an_address_held_by_another_session_or_foreign_is_refused(node) -> None:
    owner, _ = node.session("a")
    [held] = node.allocate(owner, scheme="hyperty", value={"number": 1})
    thief, _ = node.session("t")
    assert reclaim(node, thief, [held], allocationKey="k")["code"] == 409
    assert reclaim(node, thief, ["hyperty://other.test/x"], allocationKey="k")["code"] == 400
    assert reclaim(node, thief, ["hyperty://b.test/free"])["code"] == 400  # no allocationKey


def acks_to(actions, conn) -> list[tuple[int, bool]]:
    return [
        (json.loads(bytes(a.data))["body"]["ack"], a.delayed) for a in actions if isinstance(a, Ack) and a.conn is conn
    ]


def test_an_ack_may_wait_for_data_until_a_quarter_of_the_window_came() -> None:
    """Delayed acks: the core marks each ack ``delayed`` until ``ack_every`` messages came since the last
    urgent one; then the ack must go at once (the shell writes it this turn), so the sender never stalls."""
    pair = AckPair(Node(ack_every=3))
    assert acks_to(pair.send(1, 1), pair.a) == [(1, True)]
    assert acks_to(pair.send(2, 2), pair.a) == [(2, True)]
    assert acks_to(pair.send(3, 3), pair.a) == [(3, False)]  # the third since the last urgent ack
    assert acks_to(pair.send(4, 4, 5), pair.a) == [(5, True)]  # counting starts again
    assert acks_to(pair.send(6, 6), pair.a) == [(6, False)]


def test_an_ack_is_urgent_past_a_quarter_of_the_window_in_bytes() -> None:
    pair = AckPair(Node(ack_every_bytes=150))
    assert acks_to(pair.send(1, 1), pair.a) == [(1, True)]
    assert acks_to(pair.send(2, 2), pair.a) == [(2, False)]  # two frames of about 100 bytes


def test_default_acks_are_delayed(pair) -> None:
    assert acks_to(pair.send(1, 1, 2), pair.a) == [(2, True)]
