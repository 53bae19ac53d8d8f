"""The process-sandbox fixture: a real ProcessSandbox, closed after each test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from protofly.sandbox.process import ProcessSandbox


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[ProcessSandbox]:
    """A process sandbox without spares (every deploy starts its own host); bwrap if the test asks."""
    use_bwrap = getattr(request, "param", None)
    box = ProcessSandbox(use_bwrap=use_bwrap, prestart=0)
    try:
        yield box
    finally:
        await box.close()


@pytest.fixture(autouse=True)
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
