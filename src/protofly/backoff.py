"""Capped exponential backoff with full jitter: one helper for the runtime's restarts and the stubs' reconnects.

Full jitter (a uniform draw in ``[0, min(cap, base * 2**attempt)]``) spreads the retries of many clients
that failed together, which is why both the Runtime UA (restarting crashed stubs) and the message node
stub (reconnecting to its node) use it.  The random source is injected so that tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_EXPONENT", "Backoff", "full_jitter"]

#: Attempts beyond this do not grow the ceiling further (and ``2**n`` stays a small number).
MAX_EXPONENT = 32

#: ``uniform(low, high)``: the only randomness backoff needs.
Uniform = Callable[[float, float], float]


def full_jitter(attempt: int, base: float, cap: float, uniform: Uniform = random.uniform) -> float:
    """The delay before retry number ``attempt`` (0 for the first retry)."""
    ceiling = min(cap, base * (2 ** min(max(attempt, 0), MAX_EXPONENT)))
    return uniform(0.0, ceiling)


@dataclass(slots=True)
class Backoff:
    """An attempt counter with its policy: ``next()`` gives a delay and grows the counter; ``reset()`` starts over."""

    base: float
    cap: float
    uniform: Uniform = random.uniform
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap <= 0 or self.cap < self.base:
            raise ValueError(f"backoff needs 0 <= base <= cap and cap > 0, got base={self.base} cap={self.cap}")

    def next(self) -> float:
        delay = full_jitter(self.attempt, self.base, self.cap, self.uniform)
        self.attempt = min(self.attempt + 1, MAX_EXPONENT)
        return delay

    def reset(self) -> None:
        self.attempt = 0
