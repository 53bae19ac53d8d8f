"""Helpers of the containment tests: publish a hostile stub from tests/stubs_src, ask it, watch it crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from protofly.catalogue import publish
from protofly.events import RuntimeEvent, StubCrashed, StubLive
from protofly.message import Message
from protofly.sandbox import cgroup

STUBS_SRC = Path(__file__).resolve().parents[2] / "stubs_src"


def publish_stub(domains: Any, domain: str, source: str, classname: str, sandbox: dict[str, int] | None = None) -> None:
    """Sign and publish ``tests/stubs_src/<source>`` as ``domain``'s default stub, asking for ``sandbox``."""
    package = domains.root / "packages" / f"{domain}-{source}"
    package.mkdir(parents=True)
    (package / "stub.py").write_bytes((STUBS_SRC / source).read_bytes())
    descriptor: dict[str, Any] = {
        "objectName": "default",
        "version": "1.0.0",
        "language": "python",
        "sourceCodeClassname": classname,
        "configuration": {},
    }
    if sandbox is not None:
        descriptor["sandbox"] = sandbox
    (package / "descriptor.json").write_text(json.dumps(descriptor))
    publish(package, domains.root / domain, domains.key(domain), domain, version="1.0.0")


def question(domain: str, body: dict[str, Any] | None = None) -> Message:
    return Message(type="read", from_="hyperty://a.test/me", to=f"hyperty://{domain}/anyone", body=body or {})


class Watch:
    """The runtime's crash and live events, to be awaited (the stub's death is the kernel's doing)."""

    def __init__(self, runtime: Any) -> None:
        self.crashes: list[StubCrashed] = []
        self.lives: list[StubLive] = []
        self._changed = asyncio.Event()
        self.stop = runtime.events.subscribe(self._on_event)

    def _on_event(self, event: RuntimeEvent) -> None:
        if isinstance(event, StubCrashed):
            self.crashes.append(event)
        elif isinstance(event, StubLive):
            self.lives.append(event)
        self._changed.set()

    async def crash(self, timeout: float = 30.0) -> StubCrashed:
        async with asyncio.timeout(timeout):
            while not self.crashes:
                self._changed.clear()
                await self._changed.wait()
        return self.crashes[0]

    async def lives_again(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.lives) < count:
                self._changed.clear()
                await self._changed.wait()


async def fire(runtime: Any, msg: Message, timeout: float = 30.0) -> asyncio.Task[Any]:
    """Send a request whose answer may never come (the stub is killed); the caller cancels it."""

    async def request() -> Any:
        with contextlib.suppress(Exception):
            return await runtime.bus.request(msg, timeout=timeout)

    return asyncio.ensure_future(request())


def cgroup_problem() -> str | None:
    """Why this machine gives no stub a cgroup (None: it does); probing creates and removes a group."""
    tree, why = cgroup.probe()
    if tree is not None:
        tree.remove()
    return why


_PROBLEM = cgroup_problem()
needs_cgroups = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a mapping ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def zombie(pid: int) -> bool:
    return proc_status(pid).get("State", "").startswith("Z")


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat): tells a recycled pid from the original."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]
