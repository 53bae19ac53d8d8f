"""Owned background tasks: every task a component starts is kept, reaped and cancelled with it.

asyncio keeps only a weak reference to a task, so a fire-and-forget ``create_task`` can be garbage
collected mid-flight and its exception is reported, if at all, at interpreter exit.  Each long-lived part
of protofly (the bus, the runtime, the sandbox, the message node, the admin server) therefore owns a
:class:`TaskSet`: it holds the tasks, forgets them when they finish, logs an unexpected exception once,
and cancels and awaits whatever is left on shutdown, with a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from protofly.log import get_logger

__all__ = ["TaskSet"]

log = get_logger("protofly.tasks")

T = TypeVar("T")


class TaskSet:
    """A set of tasks owned by one component; ``close()`` cancels them and waits at most ``timeout``."""

    __slots__ = ("_closed", "_name", "_quiet", "_tasks")

    def __init__(self, name: str = "tasks") -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._quiet: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None, shared: bool = False) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned by this set (on the running loop).

        ``shared``: the task's outcome is awaited by others who handle its exception (a deployment that
        several callers wait for), so it is not logged here as well.
        """
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self._name}: closed, no new task may start")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if shared:
            self._quiet.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        quiet = task in self._quiet
        self._quiet.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio never warns "exception was never retrieved"
        if exc is not None and not quiet:
            log.error("background task failed", owner=self._name, task=task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new tasks, cancel the running ones and wait for them (at most ``timeout`` seconds)."""
        self._closed = True
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
