"""Waiting for a condition that nothing signals (a server's traffic counters), with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: How often the condition is re-checked: short enough for fast tests, long enough not to spin.
INTERVAL = 0.01


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once ``predicate()`` is true; raise :class:`TimeoutError` after ``timeout`` seconds.

    Polling on purpose: a message node's counters change with traffic and have no event to await.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"condition not reached within {timeout} s")
        await asyncio.sleep(min(remaining, INTERVAL))
