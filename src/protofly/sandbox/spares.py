"""The spare pool: sandbox hosts started ahead of the deploys that will take them.

Importing asyncio and msgspec takes most of a Python start, so the process sandbox keeps ``size`` hosts
started and idle (imports done, no stub code, no limits yet).  A deploy takes one; its replacement starts
when the owner says the deploy is over (:meth:`SparePool.settle`), not at once: a host's start is ~100 ms
of CPU and kernel work (namespaces, a cgroup move), and on a machine with two cores it would take a third
of the CPU the deploy itself needs.  The next deploy's :meth:`SparePool.refill` starts it anyway.  The pool
owns the starting and started spares, in start order; it knows a host only through :class:`Spare`, so it
depends on nothing above it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from protofly.log import get_logger
from protofly.sandbox import DeployError, SandboxError
from protofly.tasks import TaskSet

__all__ = ["Spare", "SparePool"]

_log = get_logger("protofly.sandbox")


class Spare(Protocol):
    """What the pool needs of a host."""

    @property
    def state(self) -> str:
        """``ready`` while the host is started and unused."""

    def poll_exit(self) -> None:
        """Notice now if the host has exited (a spare killed a moment ago may not have been noticed)."""

    async def remove(self, grace: float = 2.0) -> None:
        """Stop the host and reap it."""


H = TypeVar("H", bound=Spare)


class SparePool(Generic[H]):
    """``size`` hosts kept started; ``start()`` makes one (raising ``SandboxError`` if it cannot)."""

    def __init__(self, size: int, start: Callable[[], Coroutine[Any, Any, H]], tasks: TaskSet) -> None:
        self.size = size
        self._start = start
        self._tasks = tasks
        self._spares: deque[asyncio.Task[H]] = deque()
        self._closed = False
        #: Hosts taken and not replaced yet (their deploys are still running).
        self.owed = 0

    def refill(self) -> None:
        """Start spares until ``size`` are started or starting."""
        self.owed = 0
        while len(self._spares) < self.size and not self._closed:
            task = self._tasks.spawn(self._start(), name="sandbox spare", shared=True)
            task.add_done_callback(_log_spare_failure)
            self._spares.append(task)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the spares now starting are started (or failed), at most ``timeout`` seconds."""
        if self._spares:
            await asyncio.wait(list(self._spares), timeout=timeout)

    def settle(self) -> None:
        """The deploys that took hosts are over: start their replacements now."""
        if self.owed:
            self.refill()

    async def take(self) -> H:
        """A started host: a ready spare if there is one, else the next one starting, else a new one.

        Its replacement is owed until :meth:`settle` (or the next :meth:`refill`).
        """
        while self._spares:
            ready = next((t for t in self._spares if t.done()), None)
            task = ready or self._spares[0]
            self._spares.remove(task)
            try:
                await asyncio.wait([task])  # unlike `await task`, a cancelled spare is not our own cancellation
            except asyncio.CancelledError:
                self._spares.appendleft(task)  # still good for the next deploy
                raise
            if task.cancelled() or self._closed:
                raise SandboxError("the sandbox is closed")
            if task.exception() is not None:
                continue  # logged by _log_spare_failure; try the next, or a fresh start below
            host = task.result()
            host.poll_exit()
            if host.state == "ready":
                self.owed += 1
                return host
        try:
            host = await self._start()
        except SandboxError as exc:
            raise DeployError(str(exc)) from None
        self.owed += 1
        return host

    async def close(self, grace: float, start_timeout: float) -> None:
        """Start no more; cancel the spares still starting and remove the started ones."""
        self._closed = True
        spares = list(self._spares)
        self._spares.clear()
        for task in spares:
            task.cancel()
        await asyncio.gather(*(_remove(task, grace, start_timeout) for task in spares), return_exceptions=True)


async def _remove(task: asyncio.Task[H], grace: float, start_timeout: float) -> None:
    await asyncio.wait([task], timeout=start_timeout)
    if task.done() and not task.cancelled() and task.exception() is None:
        await task.result().remove(grace)


def _log_spare_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.warning("a pre-started sandbox host failed", error=str(task.exception()))
