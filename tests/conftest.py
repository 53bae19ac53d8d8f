"""Shared fixtures.  Tests start the real components they need on 127.0.0.1 and stop them themselves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "conformance" / "data"


@pytest.fixture
def protofly_logs_reach_caplog() -> Iterator[None]:
    """Undo a CLI's ``log.configure`` (a handler on a closed stream, propagation off) for this test."""
    logger = logging.getLogger("protofly")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
        logger.setLevel(saved[2])


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


class Inbox:
    """A listener that records what it gets and lets a test await a count, instead of polling."""

    def __init__(self) -> None:
        self.items: list = []
        self._changed = asyncio.Event()

    def __call__(self, item) -> None:
        self.items.append(item)
        self._changed.set()

    append = __call__

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items


@pytest.fixture
def make_inbox() -> type[Inbox]:
    return Inbox
