"""The core's seam to a cluster (``MessageNodeCore.remote``), driven without sockets or NATS.

The remote here is a small table of what other nodes hold (the way ``ClusterLink`` answers from its caches);
the tests look only at the actions the core returns and at what it asked the remote to do.
"""

from __future__ import annotations

import itertools
import json

from protofly.message import decode
from protofly.msgnode.actions import CLOSE_SESSION_TAKEN_OVER, Allocate, Claim, Close, Replay, Send
from protofly.msgnode.core import SESSION_URL, MessageNodeCore
from protofly.msgnode.session import Session

D = "b.test"
ALLOC = f"domain://msg-node.{D}/address-allocation"
SM = f"domain://msg-node.{D}/sm"


class OtherNodes:
    """What the rest of a cluster holds: addresses and resources of sessions elsewhere."""

    def __init__(self) -> None:
        self.addresses: set[str] = set()
        self.resources: set[str] = set()
        self.forwarded: list[tuple[str, bytes]] = []
        self.published: list[tuple[str, bytes]] = []
        self.events: list[tuple[str, str]] = []
        self.resource_events: list[tuple[str, bool]] = []

    def forward(self, to: str, data: bytes) -> bool:
        if to not in self.addresses:
            return False
        self.forwarded.append((to, data))
        return True

    def fan_out(self, resource: str, data: bytes) -> bool:
        if resource not in self.resources:
            return False
        self.published.append((resource, data))
        return True

    def session_changed(self, session: Session, event: str) -> None:
        self.events.append((event, session.runtime_url))

    def resource_changed(self, resource: str, subscribed: bool) -> None:
        self.resource_events.append((resource, subscribed))


def frame(**fields) -> bytes:
    fields["from"] = fields.pop("from_")
    return json.dumps(fields).encode()


def sent(actions, conn=None) -> list[dict]:
    return [json.loads(bytes(a.data)) for a in actions if isinstance(a, Send) and (conn is None or a.conn is conn)]


def make() -> tuple[MessageNodeCore, OtherNodes]:
    counter = itertools.count(1)
    core = MessageNodeCore(D, new_id=lambda: f"id{next(counter)}")
    others = OtherNodes()
    core.remote = others
    return core, others


def open_session(core: MessageNodeCore, conn: object, runtime: str) -> str:
    core.connected(conn)
    [reply] = sent(core.received(conn, frame(id=1, type="open", from_=runtime, to=SESSION_URL)))
    return f"{runtime}/{reply['body']['runtimeToken']}"


def test_session_transitions_are_told_to_the_cluster() -> None:
    core, others = make()
    conn = object()
    open_session(core, conn, "hyperty-runtime://a.test/rt")
    core.disconnected(conn, now=0.0)
    core.tick(now=100.0)
    assert others.events == [(e, "hyperty-runtime://a.test/rt") for e in ("opened", "detached", "ended")]


def test_a_message_for_a_session_elsewhere_goes_to_the_cluster_and_unknown_ones_are_404() -> None:
    core, others = make()
    conn = object()
    open_session(core, conn, "hyperty-runtime://a.test/rt")
    others.addresses.add("hyperty://b.test/far")
    data = frame(id=2, type="update", from_="hyperty://a.test/h", to="hyperty://b.test/far", body={"n": 1})
    assert core.received(conn, data) == []
    assert others.forwarded == [("hyperty://b.test/far", data)]  # the exact bytes received
    missing = frame(id=3, type="update", from_="hyperty://a.test/h", to="hyperty://b.test/none")
    [answer] = sent(core.received(conn, missing))
    assert answer["body"]["code"] == 404
    assert core.counters["forwarded"] == 1


def test_allocation_waits_for_the_cluster_then_answers() -> None:
    core, _ = make()
    conn = object()
    session_url = open_session(core, conn, "hyperty-runtime://a.test/rt")
    request = frame(
        id=4, type="create", from_="hyperty-runtime://a.test/rt/registry", to=ALLOC, body={"allocationKey": "k"}
    )
    [action] = core.received(conn, request)
    assert isinstance(action, Allocate) and action.session == session_url and action.key == "k"
    assert core.owner(action.addresses[0]) is None  # nothing taken before the cluster agreed
    [reply] = sent(core.allocated(conn, action.msg, action.addresses, action.key, None))
    assert reply["body"]["code"] == 200 and reply["body"]["value"]["allocated"] == action.addresses
    assert core.owner(action.addresses[0]) is not None


def test_a_refused_allocation_is_answered_with_the_clusters_reason() -> None:
    from protofly.msgnode.actions import Refused

    core, _ = make()
    conn = object()
    open_session(core, conn, "hyperty-runtime://a.test/rt")
    request = frame(
        id=4, type="create", from_="hyperty-runtime://a.test/rt/registry", to=ALLOC, body={"allocationKey": "k"}
    )
    [action] = core.received(conn, request)
    refused = Refused(409, "allocationKey 'k' is held by another session of this domain")
    [reply] = sent(core.allocated(conn, action.msg, action.addresses, action.key, refused))
    assert reply["body"]["code"] == 409 and "held by another session" in reply["body"]["description"]
    assert core.owner(action.addresses[0]) is None


def test_reopen_of_a_session_held_elsewhere_is_a_claim_and_adopt_replays_its_buffer() -> None:
    core, others = make()
    conn = object()
    core.connected(conn)
    url = "hyperty-runtime://a.test/rt/tok"
    [claim] = core.received(conn, frame(id=5, type="re-open", from_=url, to=SESSION_URL))
    assert isinstance(claim, Claim)
    session = Session(runtime_url="hyperty-runtime://a.test/rt", token="tok", url=url, addresses={"hyperty://b.test/x"})
    session.subscriptions = {"comm://b.test/o": {"hyperty://b.test/x"}}
    session.subscription_count = 1
    actions = core.adopt(conn, claim.msg, session, [b'{"buffered":1}'])
    [reply] = sent(actions)
    assert reply["body"] == {"code": 200, "runtimeToken": "tok"}
    assert [a.frames for a in actions if isinstance(a, Replay)] == [[b'{"buffered":1}']]
    assert core.owner("hyperty://b.test/x") is session and core.subscribers("comm://b.test/o") == [session]
    assert others.resource_events == [("comm://b.test/o", True)]
    assert ("attached", "hyperty-runtime://a.test/rt") in others.events


def test_hand_off_closes_with_4000_and_gives_the_buffer_to_the_new_owner() -> None:
    core, _ = make()
    holder, peer = object(), object()
    url = open_session(core, holder, "hyperty-runtime://a.test/rt")
    open_session(core, peer, "hyperty-runtime://p.test/rt")
    core.disconnected(holder, now=0.0)
    core.received(peer, frame(id=6, type="update", from_="hyperty-runtime://p.test/rt", to=url + "/x", body={}))
    actions, frames = core.hand_off(url)
    assert len(frames) == 1 and decode(frames[0]).to == url + "/x"
    assert core.session(url) is None and core.counters["sessions_handed_off"] == 1
    assert not [a for a in actions if isinstance(a, Close)]  # detached: no socket to close
    other = object()
    url2 = open_session(core, other, "hyperty-runtime://c.test/rt")
    actions, _ = core.hand_off(url2)
    assert [a.code for a in actions if isinstance(a, Close)] == [CLOSE_SESSION_TAKEN_OVER]


def test_messages_from_other_nodes_reach_local_sessions_or_say_not_here() -> None:
    core, _ = make()
    conn = object()
    url = open_session(core, conn, "hyperty-runtime://a.test/rt")
    actions = core.remote_deliver(url, b'{"n":1}')
    assert actions is not None and [bytes(a.data) for a in actions if isinstance(a, Send)] == [b'{"n":1}']
    assert core.remote_deliver("hyperty-runtime://z.test/rt/none", b"{}") is None


def test_a_message_the_cluster_could_not_deliver_is_answered_to_its_sender() -> None:
    core, _ = make()
    conn = object()
    open_session(core, conn, "hyperty-runtime://a.test/rt")
    data = frame(id=7, type="execute", from_="hyperty-runtime://a.test/rt/h", to="hyperty://b.test/gone")
    [answer] = sent(core.undeliverable(data, 404, "no route: the session ... no longer exists"), conn)
    assert answer["id"] == 7 and answer["body"]["code"] == 404
    response = frame(id=8, type="response", from_="hyperty://b.test/gone", to="hyperty-runtime://a.test/rt/h")
    assert core.undeliverable(response, 404, "x") == []  # a response is never answered
