"""The stub SDK (protofly.stub) on a real Bus, and the loader that turns source into an instance."""

from __future__ import annotations

import asyncio

import pytest

from protofly.message import Message, MessageError
from protofly.sandbox.loader import LoadError, execute, load
from protofly.stub import Bus, MethodNotFound, ProtoStub, carries_via

URL = "hyperty-runtime://a.test/r1/protostub/1"


class Recorder:
    """The runtime end of a Bus: what the stub posts."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.bus = Bus(self.sent.append)

    def statuses(self) -> list[str]:
        return [m.body["value"] for m in self.sent if m.to == f"{URL}/status"]

    def data(self) -> list[Message]:
        return [m for m in self.sent if m.to != f"{URL}/status"]


def incoming(n: int = 1, via: str | None = None) -> Message:
    body = {"n": n} if via is None else {"n": n, "via": via}
    return Message(id=n, type="create", from_="hyperty://a.test/h", to="hyperty://b.test/x", body=body)


class Echo(ProtoStub):
    def __init__(self, url, bus, config):
        super().__init__(url, bus, config)
        self.seen: list[int] = []
        self.credentials = None
        self.two_seen = asyncio.Event()

    async def connect(self, credentials=None):
        self.credentials = credentials

    def on_message(self, msg):
        self.seen.append(msg.body["n"])
        if len(self.seen) == 2:
            self.two_seen.set()
        self.deliver(Message(type="response", from_=msg.to, to=msg.from_, body={"n": msg.body["n"]}))


async def test_construction_publishes_created_with_the_status_shape():
    rec = Recorder()
    Echo(URL, rec.bus, {})
    status = rec.sent[0]
    assert (status.type, status.from_, status.to, status.body) == ("update", URL, f"{URL}/status", {"value": "created"})
    assert status.id is not None


async def test_the_first_message_auto_connects_then_is_delivered():
    rec = Recorder()
    stub = Echo(URL, rec.bus, {})
    rec.bus.dispatch(incoming(1))
    rec.bus.dispatch(incoming(2))
    await asyncio.wait_for(stub.two_seen.wait(), 2)
    assert rec.statuses() == ["created", "in-progress", "live"]
    assert stub.seen == [1, 2]
    assert [m.body["via"] for m in rec.data()] == [URL, URL]


async def test_messages_carrying_the_stub_s_own_via_are_dropped_both_ways():
    rec = Recorder()
    stub = Echo(URL, rec.bus, {})
    await stub.handle_execute("connect", [None])
    rec.bus.dispatch(incoming(1, via=URL))
    assert stub.seen == []
    assert (
        stub.deliver(Message(type="create", from_="hyperty://b.test/x", to="hyperty://a.test/y", body={"via": URL}))
        is False
    )
    assert stub.deliver({"type": "create", "from": "hyperty://b.test/x", "to": "hyperty://a.test/y"}) is True
    assert rec.data()[-1].body == {"via": URL}


def test_via_may_be_a_string_or_a_list():
    assert carries_via({"via": URL}, URL)
    assert carries_via({"via": ["x", URL]}, URL)
    assert not carries_via({"via": "other"}, URL)
    assert not carries_via(None, URL)


async def test_connect_from_the_runtime_passes_credentials_and_reports_live():
    rec = Recorder()
    stub = Echo(URL, rec.bus, {})
    await stub.handle_execute("connect", [{"token": "t"}])
    assert stub.credentials == {"token": "t"}
    assert stub.connected
    assert rec.statuses() == ["created", "in-progress", "live"]


async def test_credentials_are_not_lost_to_a_running_anonymous_auto_connect():
    class Gated(ProtoStub):
        def __init__(self, url, bus, config):
            super().__init__(url, bus, config)
            self.gate = asyncio.Event()
            self.started = asyncio.Event()
            self.logins: list[object] = []

        async def connect(self, credentials=None):
            self.logins.append(credentials)
            self.started.set()
            await self.gate.wait()

    rec = Recorder()
    stub = Gated(URL, rec.bus, {})
    rec.bus.dispatch(incoming(1))  # starts an auto-connect without credentials
    await asyncio.wait_for(stub.started.wait(), 2)
    explicit = asyncio.ensure_future(stub.handle_execute("connect", [{"token": "t"}]))
    stub.gate.set()
    await asyncio.wait_for(explicit, 2)
    assert stub.logins == [None, {"token": "t"}]
    assert stub.connected


async def test_after_an_explicit_disconnect_messages_do_not_reconnect_until_connect():
    rec = Recorder()
    stub = Echo(URL, rec.bus, {})
    await stub.handle_execute("connect", [None])
    await stub.handle_execute("disconnect", [])
    rec.bus.dispatch(incoming(1))
    assert rec.statuses() == ["created", "in-progress", "live", "disconnected"]
    assert stub.seen == [1]
    await stub.handle_execute("connect", [None])
    assert rec.statuses()[-1] == "live"


async def test_a_failing_connect_publishes_failed_with_the_summary_and_raises():
    class Refused(ProtoStub):
        async def connect(self, credentials=None):
            raise PermissionError("bad token")

    rec = Recorder()
    stub = Refused(URL, rec.bus, {})
    with pytest.raises(PermissionError):
        await stub.handle_execute("connect", [{"token": "secret"}])
    assert rec.sent[-1].body == {"value": "failed", "description": "PermissionError: bad token"}


async def test_a_status_published_by_connect_itself_is_not_overridden():
    class Slow(ProtoStub):
        async def connect(self, credentials=None):
            self.status("disconnected", "timeout from mn:/session")

    rec = Recorder()
    await Slow(URL, rec.bus, {}).handle_execute("connect", [None])
    assert rec.statuses() == ["created", "in-progress", "disconnected"]


async def test_async_on_message_runs_in_arrival_order():
    class Slowpoke(ProtoStub):
        def __init__(self, url, bus, config):
            super().__init__(url, bus, config)
            self.order: list[int] = []
            self.first_may_finish = asyncio.Event()
            self.all_done = asyncio.Event()
            self.first_started = asyncio.Event()

        async def on_message(self, msg):
            if msg.body["n"] == 1:
                self.first_started.set()
                await self.first_may_finish.wait()
            self.order.append(msg.body["n"])
            if len(self.order) == 3:
                self.all_done.set()

    rec = Recorder()
    stub = Slowpoke(URL, rec.bus, {})
    await stub.handle_execute("connect", [None])
    for n in (1, 2, 3):
        rec.bus.dispatch(incoming(n))
    await asyncio.wait_for(stub.first_started.wait(), 2)
    assert stub.order == []  # 2 and 3 wait behind the unfinished 1
    stub.first_may_finish.set()
    await asyncio.wait_for(stub.all_done.wait(), 2)
    assert stub.order == [1, 2, 3]


async def test_status_values_are_lower_case_and_connected_means_live():
    rec = Recorder()
    stub = ProtoStub(URL, rec.bus, {})
    stub.status("CONNECTED")
    assert stub.connected
    assert rec.statuses()[-1] == "connected"
    with pytest.raises(ValueError, match="status value"):
        stub.status("")


async def test_bus_listeners_by_address_come_before_the_default_listener():
    rec = Recorder()
    hits: list[str] = []
    rec.bus.add_listener("*", lambda m: hits.append("default"))
    remove = rec.bus.add_listener("hyperty://b.test/x", lambda m: hits.append("specific"))
    rec.bus.dispatch(incoming())
    remove()
    rec.bus.dispatch(incoming())
    assert hits == ["specific", "default"]


async def test_a_failing_listener_does_not_stop_the_others():
    rec = Recorder()
    hits: list[str] = []
    rec.bus.add_listener("*", lambda m: 1 / 0)
    rec.bus.add_listener("*", lambda m: hits.append("ok"))
    rec.bus.dispatch(incoming())
    assert hits == ["ok"]


async def test_bus_post_validates_dicts_and_assigns_ids():
    rec = Recorder()
    assert rec.bus.post({"type": "create", "from": URL, "to": "hyperty://b.test/x"}) == 1
    with pytest.raises(MessageError, match="from"):
        rec.bus.post({"type": "create", "to": "hyperty://b.test/x"})
    with pytest.raises(ValueError, match="listener address"):
        rec.bus.add_listener("", print)


async def test_execute_runs_public_methods_and_refuses_others():
    rec = Recorder()
    stub = Echo(URL, rec.bus, {})
    assert await execute(stub, "init", []) is None
    with pytest.raises(MethodNotFound, match="no method 'fly'"):
        await execute(stub, "fly", [])
    with pytest.raises(MethodNotFound, match="not a public method"):
        await execute(stub, "_connect", [None])


# -- the loader --------------------------------------------------------------------------------------

ECHO_SOURCE = b"""
from protofly.stub import ProtoStub

class Helper:
    pass

class MyStub(ProtoStub):
    pass
"""


async def test_load_by_classname_by_activate_and_by_the_only_subclass():
    for classname in ("MyStub", None):
        instance = await load(
            ECHO_SOURCE, url=URL, config={}, classname=classname, bus=Recorder().bus, module_name="t1"
        )
        assert type(instance).__name__ == "MyStub"
    source = b"class S:\n    def __init__(self, url, cfg):\n        self.url = url\n\n"
    source += b"def activate(url, bus, config):\n    return {'name': 'S', 'instance': S(url, config)}\n"
    instance = await load(
        source, url=URL, config={"a": 1}, classname="VertxProtoStub", bus=Recorder().bus, module_name="t2"
    )
    assert type(instance).__name__ == "S"


async def test_an_async_activate_is_awaited():
    source = b"async def activate(url, bus, config):\n    return object()\n"
    assert await load(source, url=URL, config={}, classname=None, bus=Recorder().bus, module_name="t3") is not None


@pytest.mark.parametrize(
    ("source", "classname", "summary"),
    [
        (b"x = 1\n\ndef broken(:\n    pass\n", None, "SyntaxError: invalid syntax (stub.py, line 3)"),
        (b"def activate(url, bus, config):\n    raise RuntimeError('no url')\n", None, "RuntimeError: no url"),
        (b"import no_such_module_here\n", None, "ModuleNotFoundError: No module named 'no_such_module_here'"),
        (b"x = 1\n", "Missing", "NameError: the stub defines neither class 'Missing' nor activate(url, bus, config)"),
        (b"x = 1\n", None, "NameError: the stub defines no activate(url, bus, config), names no sourceCodeClassname"),
        (b"def activate(u, b, c):\n    return None\n", None, "TypeError: activate() returned None"),
        (
            b"def activate(u, b, c):\n    return {'name': 'x'}\n",
            None,
            "TypeError: activate() returned a mapping without",
        ),
        (b"\xff\xfe not utf-8", None, "UnicodeDecodeError: stub source is not UTF-8 text"),
    ],
)
async def test_load_errors_are_one_line_summaries(source, classname, summary):
    with pytest.raises(LoadError) as caught:
        await load(source, url=URL, config={}, classname=classname, bus=Recorder().bus, module_name="t4")
    assert caught.value.summary.startswith(summary)
