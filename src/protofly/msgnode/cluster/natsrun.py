"""Start a local NATS cluster (JetStream, three servers) on 127.0.0.1, for tests, benchmarks and trials.

The message node cluster needs a NATS cluster with JetStream; an operator runs one already.  Tests and
``bench/cluster.py`` start their own: one ``nats-server`` process per member, each with a config written to a
temporary directory, client and route ports chosen at run time (bound to port 0 then released, then
retried on a clash), routes on 127.0.0.1 only.  Each server is stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NatsCluster", "NatsServer", "nats_server_binary"]

_READY_TIMEOUT = 15.0


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable on PATH (or in /usr/sbin, where Debian puts it), or None."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class NatsServer:
    """One member: its name, ports, config and (while running) its process."""

    name: str
    port: int
    cluster_port: int
    directory: Path
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class NatsCluster:
    """``size`` JetStream servers forming one cluster; use as ``async with NatsCluster(tmp) as nats``."""

    def __init__(self, directory: Path, size: int = 3, *, binary: str | None = None) -> None:
        found = binary or nats_server_binary()
        if found is None:
            raise FileNotFoundError("nats-server not found (Debian: apt-get install nats-server)")
        self.binary = found
        self.directory = Path(directory)
        self.size = size
        self.servers: list[NatsServer] = []

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All members, comma separated: what ``--cluster`` takes."""
        return ",".join(self.urls)

    async def start(self) -> None:
        ports = _free_ports(2 * self.size)
        for index in range(self.size):
            name = f"n{index + 1}"
            directory = self.directory / name
            directory.mkdir(parents=True, exist_ok=True)
            self.servers.append(NatsServer(name, ports[2 * index], ports[2 * index + 1], directory))
        for server in self.servers:
            self._write_config(server)
            await self.start_server(server)
        await asyncio.gather(*(self._ready(server) for server in self.servers))
        await self.wait_jetstream()

    async def wait_jetstream(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait (bounded) until the cluster elected its JetStream meta leader: before that, API calls fail."""
        import nats
        from nats.js.errors import Error as JetStreamError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        nc = await nats.connect(self.urls, connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=1.0)
            while True:
                try:
                    await js.account_info()
                    return
                except (JetStreamError, nats.errors.TimeoutError):
                    if loop.time() > deadline:
                        raise TimeoutError(f"JetStream cluster not ready within {timeout:g} s") from None
                    await asyncio.sleep(0.1)  # the meta leader election announces nothing to a client
        finally:
            await nc.close()

    def _write_config(self, server: NatsServer) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{s.cluster_port}" for s in self.servers if s is not server)
        store = server.directory / "js"
        config = (
            f'server_name: "{server.name}"\n'
            f"listen: 127.0.0.1:{server.port}\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 1GB }}\n'
            f'cluster {{ name: "protofly", listen: 127.0.0.1:{server.cluster_port}, routes: [{routes}] }}\n'
        )
        (server.directory / "nats.conf").write_text(config)

    async def start_server(self, server: NatsServer) -> None:
        """(Re)start one member with its config (a restarted member keeps its ports and store)."""
        log = open(server.directory / "nats.log", "ab")  # noqa: ASYNC230 - a local log file, handed to the child
        try:
            server.process = await asyncio.create_subprocess_exec(
                self.binary, "-c", str(server.directory / "nats.conf"), stdout=log, stderr=log
            )
        finally:
            log.close()

    async def _ready(self, server: NatsServer) -> None:
        """Wait (bounded) until the member answers on its client port with JetStream up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _READY_TIMEOUT
        while True:
            if server.process is not None and server.process.returncode is not None:
                log = (server.directory / "nats.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server {server.name} exited ({server.process.returncode}): {log}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout=1.0)
                finally:
                    writer.close()
                if line.startswith(b"INFO") and b'"jetstream":true' in line:
                    return
            if loop.time() > deadline:
                raise TimeoutError(f"nats-server {server.name} not ready within {_READY_TIMEOUT:g} s")
            await asyncio.sleep(0.05)  # polling a port: the server tells us nothing else

    async def kill(self, server: NatsServer) -> None:
        """SIGKILL one member (a fault test) and reap it."""
        process = server.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()

    async def stop(self) -> None:
        for server in self.servers:
            process = server.process
            if process is None or process.returncode is not None:
                continue
            process.send_signal(signal.SIGTERM)
        for server in self.servers:
            process = server.process
            if process is None or process.returncode is not None:
                continue
            try:
                await asyncio.wait_for(process.wait(), timeout=5.0)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def __aenter__(self) -> NatsCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
