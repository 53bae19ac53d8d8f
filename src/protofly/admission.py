"""Admission of on-demand deployments: how many stubs, how many deployments at once, and which domains failed.

A message from local code to an address of a new domain deploys that domain's stub (the seed's trigger).
Without bounds, code that writes to many domains (or a typo in a loop) fills the stub table and the
catalogue's logs.  :class:`DeployAdmission` decides, without I/O and with an injected clock, whether a new
domain may get a stub now; a domain whose failed stub was evicted to make room is answered from a bounded
negative cache until ``negative_ttl`` passes.  Stubs cannot trigger deployments at all (the trust boundary
forbids them to relay), so these bounds are about the runtime's own callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["NEGATIVE_CACHE_SIZE", "DeployAdmission", "Refusal"]

#: Domains remembered in the negative cache at once (oldest forgotten first).
NEGATIVE_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a new domain gets no stub now: the code and text its sender gets."""

    code: int
    description: str


class DeployAdmission:
    """The bounds on stub records and concurrent deployments, and the negative cache."""

    def __init__(self, *, max_stubs: int, max_deploying: int, negative_ttl: float, clock: Callable[[], float]) -> None:
        self.max_stubs = max_stubs
        self.max_deploying = max_deploying
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._failed: dict[str, tuple[float, Refusal]] = {}  # domain -> (until, why); insertion order: oldest first
        self.counters = {"deploys_refused": 0, "negative_cache_hits": 0}

    def check(self, domain: str, *, stubs: int, deploying: int, evictable: bool) -> Refusal | None:
        """None if ``domain`` may get a stub now (after evicting a failed one when ``evictable``)."""
        cached = self._failed.get(domain)
        if cached is not None:
            until, why = cached
            if self._clock() < until:
                self.counters["negative_cache_hits"] += 1
                return why
            del self._failed[domain]
        if deploying >= self.max_deploying:
            return self._refuse(f"{deploying} deployments are in progress (max_concurrent_deploys)")
        if stubs >= self.max_stubs and not evictable:
            return self._refuse(f"the runtime holds {stubs} stubs (max_stubs) and none of them can be evicted")
        return None

    def remember_failure(self, domain: str, code: int, description: str) -> None:
        """An evicted failed stub's domain: answer it from the cache for ``negative_ttl`` seconds."""
        self._failed.pop(domain, None)
        self._failed[domain] = (self._clock() + self.negative_ttl, Refusal(code, description))
        if len(self._failed) > NEGATIVE_CACHE_SIZE:
            del self._failed[next(iter(self._failed))]

    def _refuse(self, description: str) -> Refusal:
        self.counters["deploys_refused"] += 1
        return Refusal(503, f"no stub deployed: {description}")
