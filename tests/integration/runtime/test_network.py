"""Network as a capability, through the full runtime path: a signed stub, served by a catalogue, deployed in
a process sandbox with bwrap.  The stub (tests/stubs_src/net_probe.py) tries the network by itself and
through ``open_connection``; the runtime must refuse and count whatever its descriptor does not declare.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import publish
from protofly.message import Message, response_code
from protofly.sandbox.isolation import probe

STUBS_SRC = Path(__file__).resolve().parents[2] / "stubs_src"


@pytest.fixture(autouse=True)
async def _needs_network_namespace() -> None:
    found = await probe()
    if not found.network:
        pytest.skip(f"no network namespace on this machine: {'; '.join(found.missing)}")


def publish_probe(domains, domain: str, egress: list[str] | None) -> None:
    """Sign and publish the network probe as ``domain``'s default stub, declaring ``egress`` (None: no field)."""
    package = domains.root / "packages" / f"{domain}-net"
    package.mkdir(parents=True)
    (package / "stub.py").write_bytes((STUBS_SRC / "net_probe.py").read_bytes())
    template: dict[str, Any] = {
        "objectName": "default",
        "version": "1.0.0",
        "language": "python",
        "sourceCodeClassname": "NetProbe",
        "configuration": {},
    }
    if egress is not None:
        template["egress"] = egress
    (package / "descriptor.json").write_text(json.dumps(template))
    publish(package, domains.root / domain, domains.key(domain), domain, version="1.0.0")


class Listener:
    """A TCP server on 127.0.0.1 recording the connections it accepts and the lines it reads."""

    def __init__(self) -> None:
        self.accepted = 0
        self.lines: list[str] = []
        self.got_line = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(ConnectionError):
            line = await reader.readline()
            self.lines.append(line.decode().strip())
            self.got_line.set()
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), 5)


@pytest.fixture
async def listeners() -> AsyncIterator[tuple[Listener, Listener]]:
    declared, other = Listener(), Listener()
    await declared.start()
    await other.start()
    yield declared, other
    await declared.stop()
    await other.stop()


def host_view(path: str) -> str:
    """A /proc/net file as the test process (in the host's network namespace) sees it."""
    return Path(path).read_text()


async def ask(runtime, domain: str, **body: Any) -> dict[str, Any]:
    question = Message(type="read", from_="hyperty://a.test/me", to=f"hyperty://{domain}/anyone", body=body)
    answer = await runtime.bus.request(question, timeout=20)
    assert response_code(answer) == 200, answer.body
    return answer.body["value"] if "value" in answer.body else answer.body


async def test_only_declared_endpoints_are_opened_and_refusals_are_counted(domains, runtime_factory, listeners):
    declared, other = listeners
    publish_probe(domains, "b.test", [f"tcp://backend.b.test:{declared.port}"])
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", hosts={"backend.b.test": "127.0.0.1"}) as runtime:
        result = await ask(
            runtime,
            "b.test",
            open=[
                f"tcp://backend.b.test:{declared.port}",  # declared: opened by the runtime, mapped to 127.0.0.1
                f"tcp://backend.b.test:{other.port}",  # declared host, undeclared port
                f"tcp://127.0.0.1:{declared.port}",  # the same address, but not the declared host
            ],
        )
        record = runtime.registry.stub("b.test")
        assert result["open"][0] == "opened"
        await asyncio.wait_for(declared.got_line.wait(), 10)
        assert declared.lines == [f"hello from {record.url}"]
        assert result["open"][1] == (
            f"EgressError 403: egress: tcp://backend.b.test:{other.port} not declared by the stub's descriptor "
            f"(it declares tcp://backend.b.test:{declared.port})"
        )
        assert result["open"][2].startswith(f"EgressError 403: egress: tcp://127.0.0.1:{declared.port} not declared")
        assert other.accepted == 0 and declared.accepted == 1
        assert record.counters["egress_refused"] == 2
        assert record.counters["egress_opened"] == 1
        network = record.isolation["network"]
        assert network["egress"] == [f"tcp://backend.b.test:{declared.port}"]
        assert "net" in record.isolation["bwrap"]["namespaces"]


async def test_a_stub_reaches_nothing_of_the_host_by_itself(domains, runtime_factory, tmp_path) -> None:
    publish_probe(domains, "b.test", [])
    catalogue = await domains.serve("b.test")
    catalogue_port = int(catalogue.base_url.rsplit(":", 1)[1].split("/")[0])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    unix_path = str(tmp_path / "host-only.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(1)
    try:
        async with runtime_factory(sandbox="process") as runtime:
            result = await ask(
                runtime,
                "b.test",
                tcp=[["127.0.0.1", catalogue_port]],
                udp=[["127.0.0.1", udp.getsockname()[1]]],
                raw=True,
                proc=["/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix"],
            )
        # TCP and UDP to the host's loopback land on the stub's own loopback, where nothing listens.
        assert result["tcp"][0].startswith("ConnectionRefusedError")
        assert result["udp"][0].startswith("ConnectionRefusedError")
        with pytest.raises(BlockingIOError):
            udp.recvfrom(100)  # nothing arrived at the host's UDP socket
        assert result["raw"].startswith("PermissionError")
        # The host's listening ports and unix sockets are visible here, and not inside the stub.
        needle = f":{catalogue_port:04X} "
        assert needle in host_view("/proc/net/tcp")
        assert unix_path in host_view("/proc/net/unix")
        assert needle not in result["proc"]["/proc/net/tcp"]
        assert needle not in result["proc"]["/proc/net/tcp6"]
        assert unix_path not in result["proc"]["/proc/net/unix"]
    finally:
        udp.close()
        unix.close()


async def test_refused_requests_get_a_clear_error(domains, runtime_factory) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)  # a backlog of one, filled below: the next SYN is dropped, the connect never completes
    port = silent.getsockname()[1]
    filler = socket.socket()
    filler.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(filler, ("127.0.0.1", port)), 5)
    publish_probe(domains, "b.test", [f"tcp://127.0.0.1:{port}"])
    publish_probe(domains, "c.test", None)
    await domains.serve("b.test")
    await domains.serve("c.test")
    try:
        async with runtime_factory(sandbox="process", egress_connect_timeout=0.5) as runtime:
            result = await ask(
                runtime, "b.test", open=["tcp://127.0.0.1", "gopher://x.test:70/", f"tcp://127.0.0.1:{port}"]
            )
            assert result["open"][0] == (
                "EgressError 400: egress: malformed URL: 'tcp://127.0.0.1': tcp:// needs an explicit port"
            )
            assert result["open"][1].startswith("EgressError 400: egress: malformed URL: 'gopher://x.test:70/': scheme")
            assert (
                result["open"][2] == f"EgressError 504: egress: connect to tcp://127.0.0.1:{port} timed out after 0.5 s"
            )
            assert runtime.registry.stub("b.test").counters["egress_refused"] == 3
            # A descriptor without egress gets no network at all.
            bare = await ask(runtime, "c.test", open=[f"tcp://127.0.0.1:{port}"])
            assert bare["open"][0] == (
                f"EgressError 403: egress: tcp://127.0.0.1:{port} not declared by the stub's descriptor "
                "(it declares nothing)"
            )
            assert runtime.registry.stub("c.test").isolation["network"]["egress"] == []
    finally:
        filler.close()
        silent.close()
