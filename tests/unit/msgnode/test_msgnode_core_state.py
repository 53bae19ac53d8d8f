"""Random sequences of node events (restarts included) never leave the core's tables inconsistent or leaking."""

from __future__ import annotations

import itertools
import json

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protofly.msgnode.actions import Close, Replay, Send, SessionEnded
from protofly.msgnode.core import SESSION_URL, MessageNodeCore

D = "b.test"
RUNTIMES = [f"hyperty-runtime://r{i}.test/rt" for i in range(5)]
RESOURCES = [f"comm://a.test/{i}/changes" for i in range(3)]
SOURCES = [None, "hyperty://a.test/h1", "hyperty://a.test/h2"]
FOREIGN = [f"hyperty://f.test/{i}" for i in range(4)]


class Conn:
    pass


class NodeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counter = itertools.count()
        self.core = self.new_core()
        self.conns: list[Conn] = []
        self.live: set[Conn] = set()
        self.session_urls: list[str] = []
        self.now = 0.0
        self.ids = 0

    def new_core(self) -> MessageNodeCore:
        return MessageNodeCore(
            D,
            session_grace=5.0,
            max_bound=2,
            max_subscriptions=4,
            max_addresses=6,
            buffer_messages=3,
            buffer_bytes=400,
            new_id=lambda: f"id{next(self.counter)}",
        )

    def apply(self, conn: Conn, **fields) -> list:
        self.ids += 1
        fields["id"] = self.ids
        fields["from"] = fields.pop("from_")
        actions = self.core.received(conn, json.dumps(fields).encode())
        for action in actions:
            if isinstance(action, Replay):
                assert action.conn in self.live and action.frames
            elif isinstance(action, Send):
                assert action.conn in self.live
                reply = json.loads(bytes(action.data))
                if reply.get("from") == SESSION_URL and reply["body"].get("runtimeToken"):
                    self.session_urls.append(f"{reply['to']}/{reply['body']['runtimeToken']}")
            elif isinstance(action, SessionEnded):
                assert self.core.session(action.url) is None
        return actions

    @initialize()
    def three_sessions(self) -> None:
        """Start with sessions, so that detaching, buffering and re-opening are reached in few steps."""
        for runtime in RUNTIMES[:3]:
            self.connect()
            self.apply(self.conns[-1], type="open", from_=runtime, to=SESSION_URL)

    @rule()
    def connect(self) -> None:
        conn = Conn()
        self.core.connected(conn)
        self.conns.append(conn)
        self.live.add(conn)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), runtime=st.sampled_from(RUNTIMES))
    def open(self, data, runtime) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        self.apply(conn, type="open", from_=runtime, to=SESSION_URL)

    @precondition(lambda self: self.live and self.session_urls)
    @rule(data=st.data())
    def reopen(self, data) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        url = data.draw(st.sampled_from(self.session_urls))
        for action in self.apply(conn, type="re-open", from_=url, to=SESSION_URL):
            if isinstance(action, Close):  # a take-over closes the old socket: the shell would report it
                self.drop(action.conn)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), number=st.integers(1, 3), key=st.sampled_from([None, "k1", "k2"]))
    def allocate(self, data, number, key) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        value = {"number": number} | ({"allocationKey": key} if key else {})
        self.apply(
            conn, type="create", from_="x:y", to=f"domain://msg-node.{D}/address-allocation", body={"value": value}
        )

    @precondition(lambda self: self.live)
    @rule(data=st.data(), key=st.sampled_from(["k1", "k2"]))
    def delete_key(self, data, key) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        self.apply(
            conn, type="delete", from_="x:y", to=f"domain://msg-node.{D}/address-allocation", body={"resource": key}
        )

    @precondition(lambda self: self.live)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["subscribe", "unsubscribe"]),
        resource=st.sampled_from(RESOURCES),
        source=st.sampled_from(SOURCES),
    )
    def subscription(self, data, kind, resource, source) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        body = {"resources": [resource]} | ({"source": source} if source else {})
        self.apply(conn, type=kind, from_="x:y", to=f"domain://msg-node.{D}/sm", body=body)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), sender=st.sampled_from(FOREIGN), to=st.sampled_from([*RESOURCES, *FOREIGN, *RUNTIMES]))
    def message(self, data, sender, to) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        self.apply(conn, type="update", from_=sender, to=to, body={})

    @precondition(lambda self: self.with_session())
    @rule(
        data=st.data(),
        kind=st.sampled_from(["update", "read", "response"]),
        to=st.sampled_from([*RESOURCES, *RUNTIMES]),
    )
    def message_from_a_session(self, data, kind, to) -> None:
        """From a runtime that holds a session: to sessions that may be detached (buffered) or subscribed."""
        conn = data.draw(st.sampled_from(self.with_session()))
        sender = self.core.session_of(conn).runtime_url
        self.apply(conn, type=kind, from_=sender, to=to, body={"pad": "x" * data.draw(st.integers(0, 150))})

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def close(self, data) -> None:
        conn = data.draw(st.sampled_from(self.alive()))
        session = self.core.session_of(conn)
        sender = session.url if session else "hyperty-runtime://nobody.test/rt"
        for action in self.apply(conn, type="close", from_=sender, to=SESSION_URL):
            if isinstance(action, Close):
                self.drop(action.conn)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def disconnect(self, data) -> None:
        self.drop(data.draw(st.sampled_from(self.alive())))

    @precondition(lambda self: self.with_session())
    @rule(data=st.data())
    def detach(self, data) -> None:
        self.drop(data.draw(st.sampled_from(self.with_session())))

    @precondition(lambda self: self.detached())
    @rule(data=st.data())
    def reopen_detached(self, data) -> None:
        """A dropped runtime comes back on a new connection: its buffer is replayed after the 200."""
        self.connect()
        url = data.draw(st.sampled_from(self.detached()))
        buffered = len(self.core.session(url).buffer)
        actions = self.apply(self.conns[-1], type="re-open", from_=url, to=SESSION_URL)
        replayed = [frame for a in actions if isinstance(a, Replay) for frame in a.frames]
        assert len(replayed) == buffered

    @rule(seconds=st.floats(0, 10))
    def tick(self, seconds) -> None:
        self.now += seconds
        for action in self.core.tick(self.now):
            if isinstance(action, Send):  # a 410 for a message buffered for the expired session
                assert action.conn in self.live and json.loads(action.data)["body"]["code"] == 410
            else:
                assert isinstance(action, SessionEnded) and action.reason == "expired"
        deadline = self.core.next_deadline()
        assert deadline is None or deadline > self.now

    @rule()
    def restart(self) -> None:
        """A graceful restart: the snapshot, through JSON, loads into a new core and exports the same."""
        snapshot = json.loads(json.dumps(self.core.snapshot()))
        fresh = self.new_core()
        assert fresh.restore(snapshot, self.now) == self.core.session_count
        assert fresh.snapshot() == snapshot
        self.core = fresh
        self.conns = []
        self.live = set()

    def detached(self) -> list[str]:
        return sorted(s.url for s in self.core.sessions if s.conn is None)

    def with_session(self) -> list[Conn]:
        return [c for c in self.alive() if self.core.session_of(c) is not None]

    def alive(self) -> list[Conn]:
        return [c for c in self.conns if c in self.live]  # creation order: draws replay identically

    def drop(self, conn: Conn) -> None:
        if conn in self.live:
            self.live.discard(conn)
            self.core.disconnected(conn, self.now)

    @invariant()
    def tables_agree(self) -> None:
        core = self.core
        sessions = set(core.sessions)
        for address, session in core.addresses.items():
            assert session in sessions
            assert address in session.addresses or address in session.bound
        for session in sessions:
            assert all(core.addresses.owner(a) is session for a in session.addresses)
            assert all(core.addresses.owner(a) is session for a in session.bound)
            assert len(session.bound) <= core.max_bound
            assert len(session.addresses) <= core.max_addresses
            assert session.subscription_count == sum(len(s) for s in session.subscriptions.values())
            assert session.subscription_count <= core.max_subscriptions
            for resource, sources in session.subscriptions.items():
                assert sources and session in (core.subscriptions.subscribers(resource) or {})
            for key, block in session.keys.items():
                assert block and set(block) <= session.addresses, key
            assert session.buffer_bytes == sum(map(len, session.buffer))
            assert len(session.buffer) <= core.buffer_messages and session.buffer_bytes <= core.buffer_bytes
            if session.conn is not None:
                assert session.conn in self.live
                assert core.session_of(session.conn) is session
                assert session.deadline is None
                assert not session.buffer  # replayed at the re-open, filled only while detached
            else:
                assert session.deadline is not None
            assert core.sessions.of_runtime(session.runtime_url) is session
        for resource, subscribers in core.subscriptions.items():
            assert subscribers
            assert all(s in sessions and resource in s.subscriptions for s in subscribers)
        assert {core.sessions.of_runtime(s.runtime_url) for s in sessions} == sessions


NodeMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestNodeMachine = NodeMachine.TestCase
