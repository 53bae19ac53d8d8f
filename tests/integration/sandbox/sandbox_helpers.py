"""Helpers for the process-sandbox tests: real host processes, real bwrap where installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from protofly.message import Message
from protofly.sandbox import Boundary, Limits
from protofly.sandbox.process import ProcessSandbox
from protofly.sandbox.process_component import ProcessComponent

STUBS = Path(__file__).resolve().parents[2] / "stubs_src"
RUNTIME = "hyperty-runtime://a.test/r1"
URL = f"{RUNTIME}/protostub/1"
BOUNDARY = Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain="b.test")
HAS_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bwrap is not installed (apt-get install bubblewrap)")

#: Both isolation modes where bwrap exists; only the plain process otherwise.
MODES = [pytest.param(True, id="bwrap", marks=needs_bwrap), pytest.param(False, id="plain")]


class Inbox:
    """Collects what a component hands to on_message and on_exit, for awaiting in tests."""

    def __init__(self, url: str = URL) -> None:
        self.url = url
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.exits: list[str] = []
        self.exited = asyncio.Event()

    def on_message(self, msg: Message) -> None:
        self.queue.put_nowait(msg)

    def on_exit(self, reason: str) -> None:
        self.exits.append(reason)
        self.exited.set()

    async def next(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def status(self, value: str, timeout: float = 10.0) -> Message:
        """The next status update with ``value`` (earlier ones are skipped)."""
        while True:
            msg = await self.next(timeout)
            if msg.to == f"{self.url}/status" and msg.body and msg.body.get("value") == value:
                return msg

    async def data(self, timeout: float = 10.0) -> Message:
        """The next message that is not a status update."""
        while True:
            msg = await self.next(timeout)
            if msg.to != f"{self.url}/status":
                return msg


def source(name: str) -> bytes:
    return (STUBS / name).read_bytes()


async def deploy(
    sandbox: ProcessSandbox,
    name: str,
    inbox: Inbox,
    *,
    classname: str | None = None,
    config: dict[str, Any] | None = None,
    limits: Limits | None = None,
    url: str = URL,
    code: bytes | None = None,
) -> ProcessComponent:
    return await sandbox.deploy(
        url=url,
        source=code if code is not None else source(name),
        config=config or {},
        classname=classname,
        limits=limits,
        boundary=BOUNDARY,
        on_message=inbox.on_message,
        on_exit=inbox.on_exit,
    )


def request(n: int = 1, body: dict[str, Any] | None = None) -> Message:
    return Message(id=n, type="create", from_="hyperty://a.test/h", to="hyperty://b.test/x", body=body or {"n": n})


# -- processes ---------------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (bwrap's helpers and the host)."""
    found = [pid]
    for current in found:
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(x) for x in Path(f"/proc/{current}/task/{current}/children").read_text().split())
    return found


def state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None if it no longer exists."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def running_or_ours(pid: int) -> bool:
    """True if ``pid`` still runs, or is a zombie this test process failed to reap."""
    info = state(pid)
    if info is None:
        return False
    letter, parent = info
    return letter != "Z" or parent == os.getpid()


async def all_ended(pids: list[int], timeout: float = 15.0) -> None:
    """Wait (via pidfds, no polling) until every process in ``pids`` has ended."""
    loop = asyncio.get_running_loop()
    waits = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        future = loop.create_future()
        loop.add_reader(fd, lambda f=future: f.done() or f.set_result(None))
        waits.append((fd, future))
    try:
        if waits:
            await asyncio.wait_for(asyncio.gather(*(f for _, f in waits)), timeout)
    finally:
        for fd, _ in waits:
            loop.remove_reader(fd)
            os.close(fd)
