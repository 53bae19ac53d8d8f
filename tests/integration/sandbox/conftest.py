"""The process-sandbox fixture: a real ProcessSandbox, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
def _logs_reach_caplog(protofly_logs_reach_caplog: None) -> None:
    """Every test here asserts on what protofly logs (``tests/conftest.py``)."""
