"""A stub's stdout and stderr as log lines: cut, redacted, rate-limited, with the stub's URL bound.

:class:`StubOutput` owns what the output of one host needs: the secrets ``connect`` handed to the stub
(so that neither its output nor a description it sends the runtime can leak them), the token bucket that
keeps a chatty stub from flooding the log, and the last stderr lines (quoted when the host fails to
start or deploy).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from protofly.log import get_logger

__all__ = ["LINE_LIMIT", "StubOutput"]

#: Longest line logged; the rest is cut (and never buffered whole).
LINE_LIMIT = 4000
#: Output lines logged per stub: a burst of this many, then this many per second.
_LINE_BURST = 200
_LINE_RATE = 100.0
#: Shortest string treated as a secret (shorter ones would redact ordinary words).
_SECRET_MIN = 4
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "critical"}

_log = get_logger("protofly.sandbox")


class StubOutput:
    """The output log of one host; ``counters["log_lines_dropped"]`` counts what the throttle drops."""

    def __init__(self, counters: dict[str, int]) -> None:
        self._counters = counters
        self._secrets: set[str] = set()
        self._recent_stderr: deque[str] = deque(maxlen=20)
        self._tokens = float(_LINE_BURST)
        self._tokens_at = time.monotonic()
        self._throttled = False
        self._log = _log
        self._output_log = get_logger("protofly.sandbox.stub")

    def bind(self, **context: Any) -> None:
        """Name the host (``sandbox_pid``) and later the stub (``stub_url``) in every line logged."""
        self._log = _log.bind(**context)
        self._output_log = get_logger("protofly.sandbox.stub", **context)

    # -- secrets ------------------------------------------------------------------------------------

    def add_secrets(self, value: Any) -> None:
        """Remember every string in ``value`` (``connect``'s credentials) as one to hide."""
        if isinstance(value, str):
            if len(value) >= _SECRET_MIN:
                self._secrets.add(value)
        elif isinstance(value, dict):
            for item in value.values():
                self.add_secrets(item)
        elif isinstance(value, list | tuple):
            for item in value:
                self.add_secrets(item)

    @property
    def has_secrets(self) -> bool:
        return bool(self._secrets)

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    # -- lines --------------------------------------------------------------------------------------

    def reader(self, stream: str) -> asyncio.Protocol:
        """A protocol for ``loop.connect_read_pipe`` that logs ``stream`` (``stdout``/``stderr``)."""
        return _Lines(self, stream)

    def line(self, stream: str, raw: bytes) -> None:
        """Log one line of the stub's output (stdout at info, stderr at the level it starts with)."""
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) > LINE_LIMIT:
            text = text[:LINE_LIMIT] + " [cut]"
        text = self.redact(text)
        if stream == "stderr":
            self._recent_stderr.append(text)
        if not self._take_token():
            self._counters["log_lines_dropped"] += 1
            if not self._throttled:
                self._throttled = True
                self._log.warning("stub output throttled; lines are dropped and counted", limit_per_s=_LINE_RATE)
            return
        self._throttled = False
        level = "info"
        if stream == "stderr":
            level = _LEVELS.get(text.split(" ", 1)[0], "warning")
        getattr(self._output_log, level)(text, stream=stream)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(_LINE_BURST), self._tokens + (now - self._tokens_at) * _LINE_RATE)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def recent_stderr(self) -> list[str]:
        """The last stderr lines (up to 20), e.g. to classify a crash by what the process wrote last."""
        return list(self._recent_stderr)

    def stderr_tail(self) -> str:
        """``"; stderr: a | b"``, the last stderr lines for an error message, or ``""``."""
        if not self._recent_stderr:
            return ""
        return "; stderr: " + " | ".join(list(self._recent_stderr)[-5:])


class _Lines(asyncio.Protocol):
    """Splits a pipe into lines for the log; a line longer than the limit is cut, never buffered whole."""

    def __init__(self, output: StubOutput, stream: str) -> None:
        self.output = output
        self.stream = stream
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            self.output.line(self.stream, bytes(buffer[:end]))
            del buffer[: end + 1]
        if len(buffer) > LINE_LIMIT:
            self.output.line(self.stream, bytes(buffer))
            buffer.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer:
            self.output.line(self.stream, bytes(self.buffer))
            self.buffer.clear()
