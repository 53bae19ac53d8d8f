"""A message node in a process of its own: ``protofly msg-node serve``, started, watched and stopped by its pid.

Fault tests and benchmarks need the node as operators run it -- a separate process that can be SIGKILLed and
started again on the same port with the same state -- not an object in their own event loop.  This is that
process, in one place: the command line, the URL it prints when it listens, its ``/stats``, its CPU time, and
the stop (SIGTERM, then SIGKILL if it does not end in time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from typing import Any

__all__ = ["NodeProcess", "NodeStartError"]

_TICKS = os.sysconf("SC_CLK_TCK")


class NodeStartError(RuntimeError):
    """The node process did not print its URL: it refused its options or could not listen."""


class NodeProcess:
    """``protofly msg-node serve --domain <domain> --port <port> <args>`` in its own process.

    ``port`` 0 lets the node choose; after :meth:`start` it is the port the node took, so a node stopped or
    killed starts again on the same one (its stubs reconnect to the URL they know).
    """

    def __init__(self, domain: str, *args: str, port: int = 0, quiet: bool = False) -> None:
        self.domain = domain
        self.args = args
        self.port = port
        self.quiet = quiet
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the node process is not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 30.0) -> str:
        """Start the node and wait for the URL it prints once listening; :class:`NodeStartError` if none comes."""
        self.proc = proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "protofly.cli", "msg-node", "serve"),
            *("--domain", self.domain, "--port", str(self.port), *self.args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL if self.quiet else None,
        )
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
        except TimeoutError:
            line = ""
        if not line.startswith("ws://"):
            try:  # it ended (refused its options, could not listen): its own exit code says why
                code = await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:  # silent and still running: stopped
                code = await self.stop()
            raise NodeStartError(f"msg-node serve {' '.join(self.args)} did not start (exit {code}): {line!r}")
        self.url = line
        self.port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        return line

    def kill(self) -> None:
        """SIGKILL, as a crash would (no drain, no state written at exit)."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the node drains and saves its state), SIGKILL after ``timeout``; its exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            return await asyncio.wait_for(proc.wait(), timeout)

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The node's ``/stats`` (counters and gauges), read in a thread."""
        url = self.url.replace("ws://", "http://").rsplit("/ws", 1)[0] + "/stats"

        def get() -> dict[str, Any]:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return dict(json.loads(reply.read()))

        return await asyncio.to_thread(get)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the node process so far (``/proc/<pid>/stat``)."""
        with open(f"/proc/{self.pid}/stat", "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
