"""A process host's control group as the component uses it: made before the host runs, narrowed at deploy.

:mod:`~protofly.sandbox.cgroup` is the kernel interface (v2 or v1 ``memory`` + ``pids``); this is one host's
use of it: the group is made with the runtime's limits before the host runs (a spare), the host's tree is
placed in it before any of its code runs, the stub's own limits replace the runtime's at deploy, a limit
the kernel says the tree hit is counted once and becomes the exit reason, and when the host is reaped
whatever is left of its tree is killed and the group removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from structlog.stdlib import BoundLogger

from protofly.sandbox import DeployError, Limits, SandboxError
from protofly.sandbox.cgroup import CgroupError, CgroupTree, StubCgroup
from protofly.sandbox.proctree import descendants
from protofly.tasks import TaskSet

__all__ = ["HostCgroup"]


class HostCgroup:
    """One host's group (``group`` is None when the machine offers none); ``counters`` gets limit hits."""

    def __init__(self, counters: dict[str, int], tasks: TaskSet, log: Callable[[], BoundLogger]) -> None:
        self.group: StubCgroup | None = None
        #: The first limit the kernel said the tree hit since the deploy (counted once).
        self.limit_hit: str | None = None
        self._counters = counters
        self._tasks = tasks
        self._log = log
        self._cleanup: asyncio.Task[None] | None = None

    def create(self, tree: CgroupTree | None, limits: Limits) -> None:
        """A group under ``tree`` with the runtime's limits (nothing without a tree); ``SandboxError``."""
        if tree is None:
            return
        try:
            self.group = tree.new_group(limits.memory_mb << 20, limits.processes)
        except CgroupError as exc:
            raise SandboxError(f"cannot start the sandbox host: {exc}") from None

    async def place(self, pid: int) -> None:
        """Move the host's tree into the group (``OSError``).  A migration waits for an RCU grace period
        (milliseconds per process and hierarchy): in a thread, so that a deploy running meanwhile on the
        loop does not wait for a spare's start."""
        if self.group is not None:
            await asyncio.to_thread(self.group.place_tree, pid, descendants)

    def narrow(self, limits: Limits) -> None:
        """The stub's own limits, before any of its code runs; ``DeployError`` if the kernel refuses."""
        if self.group is None:
            return
        try:
            self.group.set_limits(limits.memory_mb << 20, limits.processes)
            self.group.arm()
        except CgroupError as exc:
            raise DeployError(f"the sandbox could not limit the stub's cgroup: {exc}") from None

    def usage(self) -> dict[str, Any] | None:
        return None if self.group is None else self.group.usage().as_dict()

    def hit(self) -> str | None:
        """A limit hit since the deploy (the first one found is counted, once), or None."""
        if self.limit_hit is None and self.group is not None:
            hit = self.group.hit()
            if hit is not None:
                self.limit_hit = hit.reason
                self._counters[hit.counter] = self._counters.get(hit.counter, 0) + 1
        return self.limit_hit

    def kill(self) -> None:
        if self.group is not None:
            self.group.kill()

    def remove(self) -> None:
        """Kill whatever of the tree is left (a child the host left behind), then remove the group."""
        group = self.group
        if group is not None and self._cleanup is None:
            try:
                self._cleanup = self._tasks.spawn(self._remove(group), name="remove stub cgroup", shared=True)
            except RuntimeError:  # the sandbox is closed already: kill now, the group is removed with the tree's
                group.kill()

    async def wait_removed(self, timeout: float) -> None:
        cleanup = self._cleanup
        if cleanup is not None:
            await asyncio.wait([cleanup], timeout=timeout)

    async def _remove(self, group: StubCgroup) -> None:
        try:
            left = await asyncio.to_thread(group.remove)
        except CgroupError as exc:
            self._log().error("stub cgroup not removed", error=str(exc))
            return
        if left:  # usually bwrap's helpers still exiting; a stub's orphan shows up here too
            self._log().debug("killed what was left in the stub's cgroup", count=len(left))
