"""Structured logging that stays a good library citizen.

Library code logs through structlog bound loggers (``stub_url=...``, ``runtime_url=...``) that hand
their events to the standard :mod:`logging` module with the key/values as record attributes.  The library
never configures global logging; an application (our CLI) picks a format with :func:`configure`, and
pytest's ``caplog`` sees every record, which is how tests prove that secrets never reach a log line.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger"]

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger writing to ``logging.getLogger(name)`` with ``bound`` key/values on every record."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[structlog.stdlib.render_to_log_kwargs],
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    return logger.bind(**bound) if bound else logger


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured key/values a record carries beyond the standard attributes."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class KeyValueFormatter(logging.Formatter):
    """``12:00:00 WARNING protofly.bus  event  key=value ...`` for humans."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={v}" for k, v in extras(record).items())
        stamp = self.formatTime(record, "%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.name}  {record.getMessage()}"
        if pairs:
            line = f"{line}  {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(extras(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is *now*: a test runner may swap and close the stream it saw earlier."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure(fmt: str = "console", level: str | int = "INFO") -> None:
    """Install one stderr handler on the ``protofly`` logger, in ``console`` or ``json`` format."""
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {fmt!r}")
    root = logging.getLogger("protofly")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
