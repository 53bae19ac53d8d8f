"""InProcessSandbox: the sandbox contract without a process (trusted code, fast tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protofly.message import Message, MessageError
from protofly.sandbox import Boundary, DeployError, SandboxError
from protofly.sandbox.broker import EgressPolicy
from protofly.sandbox.egress import parse_endpoint
from protofly.sandbox.inprocess import InProcessSandbox

STUBS = Path(__file__).resolve().parents[2] / "stubs_src"
RUNTIME = "hyperty-runtime://a.test/r1"
URL = f"{RUNTIME}/protostub/1"
BOUNDARY = Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain="b.test")


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()

    def __call__(self, msg: Message) -> None:
        self.queue.put_nowait(msg)

    async def next(self, timeout: float = 5.0) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def next_data(self) -> Message:
        while True:
            msg = await self.next()
            if msg.to != f"{URL}/status":
                return msg


async def deploy(sandbox: InProcessSandbox, name: str, inbox: Inbox, classname: str | None = None, config=None):
    return await sandbox.deploy(
        url=URL,
        source=(STUBS / name).read_bytes(),
        config=config or {},
        classname=classname,
        limits=None,
        boundary=BOUNDARY,
        on_message=inbox,
        on_exit=lambda reason: None,
    )


def request(n: int = 1, body=None) -> Message:
    return Message(id=n, type="create", from_="hyperty://a.test/h", to="hyperty://b.test/x", body=body or {"n": n})


async def test_echo_round_trip_and_status():
    inbox = Inbox()
    async with InProcessSandbox() as sandbox:
        component = await deploy(sandbox, "echo.py", inbox, "EchoStub")
        assert (await inbox.next()).body == {"value": "created"}
        component.post(request(1))
        reply = await inbox.next_data()
        assert reply.to == "hyperty://a.test/h"
        assert reply.body["echo"] == {"n": 1}
        assert reply.body["via"] == URL
        assert component.isolation["process"] is False
        assert "rlimits: not enforceable in-process" in component.isolation["missing"]
        assert component.counters["messages_to_stub"] == 1


async def test_messages_are_copied_across_the_boundary():
    inbox = Inbox()
    async with InProcessSandbox() as sandbox:
        component = await deploy(sandbox, "echo.py", inbox, "EchoStub")
        original = request(1)
        component.post(original)
        await inbox.next_data()
        assert "via" not in original.body


async def test_forged_from_is_dropped_and_counted():
    inbox = Inbox()
    async with InProcessSandbox() as sandbox:
        config = {"forged": ["hyperty://a.test/x", f"{RUNTIME}/registry"]}
        component = await deploy(sandbox, "forger.py", inbox, "Forger", config)
        component.post(request(1))
        honest = await inbox.next_data()
        assert honest.from_ == "hyperty://b.test/honest"
        assert component.counters["forged_from"] == 2


async def test_activate_style_stub_and_execute():
    inbox = Inbox()
    async with InProcessSandbox() as sandbox:
        component = await deploy(sandbox, "activate_style.py", inbox, config={"url": "ws://127.0.0.1:1/ws"})
        component.post(request(3))
        reply = await inbox.next_data()
        assert reply.body["config"] == {"url": "ws://127.0.0.1:1/ws"}
        answer = await component.execute("ping", ["x"], timeout=5)
        assert answer.body == {"code": 200, "value": "pong x"}
        assert (await component.execute("fly", [], timeout=5)).body["code"] == 404
        assert (await component.execute("ping", [], timeout=5)).body["code"] == 500


async def test_a_deploy_error_carries_the_summary():
    async with InProcessSandbox() as sandbox:
        with pytest.raises(DeployError, match="RuntimeError: configuration has no message node url"):
            await deploy(sandbox, "failing_activate.py", Inbox())


async def test_after_remove_posts_are_dropped_and_execute_refuses():
    inbox = Inbox()
    async with InProcessSandbox() as sandbox:
        component = await deploy(sandbox, "echo.py", inbox, "EchoStub")
        await component.remove()
        component.post(request(1))
        assert component.counters["dropped_to_stub"] == 1
        with pytest.raises(SandboxError, match="not running"):
            await component.execute("connect", [None], timeout=1)


async def test_an_oversized_message_is_refused_at_post():
    async with InProcessSandbox(max_frame=200) as sandbox:
        component = await deploy(sandbox, "echo.py", Inbox(), "EchoStub")
        with pytest.raises(MessageError, match="size"):
            component.post(request(1, {"pad": "x" * 500}))


def _traceback_stub(name: str) -> bytes:
    """A stub whose ``where`` returns the traceback of an exception raised on a line naming ``name``."""
    return (
        "import traceback\n"
        "from protofly.stub import ProtoStub\n"
        "\n"
        "class Where(ProtoStub):\n"
        "    def where(self):\n"
        "        try:\n"
        f"            raise ValueError('x')  # raised in stub {name}\n"
        "        except ValueError:\n"
        "            return traceback.format_exc()\n"
    ).encode()


async def test_each_stubs_traceback_shows_its_own_source_lines():
    async with InProcessSandbox() as sandbox:
        components = {}
        for name in ("A", "B"):
            components[name] = await sandbox.deploy(
                url=f"{RUNTIME}/protostub/{name}",
                source=_traceback_stub(name),
                config={},
                classname="Where",
                limits=None,
                boundary=BOUNDARY,
                on_message=Inbox(),
                on_exit=lambda reason: None,
            )
        for name, component in components.items():
            answer = await component.execute("where", [], timeout=5)
            trace = answer.body["value"]
            assert f"# raised in stub {name}\n" in trace, trace
            other = "B" if name == "A" else "A"
            assert f"stub {other}" not in trace


async def test_open_connection_has_the_same_egress_checks_in_process():
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await reader.readline())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    inbox = Inbox()
    egress = EgressPolicy((parse_endpoint(f"tcp://127.0.0.1:{port}"),))
    try:
        async with InProcessSandbox() as sandbox:
            component = await sandbox.deploy(
                url=URL,
                source=(STUBS / "net_probe.py").read_bytes(),
                config={},
                classname="NetProbe",
                limits=None,
                boundary=BOUNDARY,
                on_message=inbox,
                on_exit=lambda reason: None,
                egress=egress,
            )
            component.post(request(1, {"open": [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"]}))
            reply = await inbox.next_data()
            assert reply.body["value"]["open"][0] == "opened"
            assert reply.body["value"]["open"][1].startswith("EgressError 403: egress: tcp://127.0.0.1:")
            assert await asyncio.wait_for(received.get(), 5) == f"hello from {URL}\n".encode()
            assert component.counters["egress_opened"] == 1 and component.counters["egress_refused"] == 1
    finally:
        server.close()
        await server.wait_closed()
