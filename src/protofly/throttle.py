"""Rate limits for what a stub can make the runtime do: token buckets, and log lines that summarise floods.

A hostile stub can send statuses and messages as fast as its CPU allows, and every one of them that the
runtime logs costs a line on disk.  :class:`TokenBucket` bounds the rate the runtime accepts (the excess is
dropped and counted by the caller); :class:`LogThrottle` turns any number of warnings of one kind into at
most one line per interval per key, with the count of what it held back.  Both take an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from structlog.stdlib import BoundLogger

__all__ = ["LogThrottle", "TokenBucket"]

#: Keys a LogThrottle tracks at once; beyond this the oldest is forgotten (its next line logs at once).
MAX_KEYS = 1024


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take()`` is False when none is left."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        tokens = self._tokens + (now - self._last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class LogThrottle:
    """At most one warning per key and ``interval``; the next one says how many were held back."""

    __slots__ = ("_clock", "_held", "_log", "interval")

    def __init__(
        self, log: BoundLogger, interval: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self.interval = interval
        self._clock = clock
        self._held: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (logged at, held back since)

    def warning(self, key: tuple[str, ...], event: str, **fields: Any) -> bool:
        """Log ``event`` unless this key logged within the interval; True if a line was written."""
        now = self._clock()
        entry = self._held.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._held[key] = (entry[0], entry[1] + 1)
            return False
        held = entry[1] if entry is not None else 0
        if held:
            fields["suppressed"] = held
            fields["suppressed_seconds"] = round(now - entry[0], 1) if entry is not None else 0.0
        self._log.warning(event, **fields)
        self._held.pop(key, None)
        self._held[key] = (now, 0)
        if len(self._held) > MAX_KEYS:
            del self._held[next(iter(self._held))]
        return True
