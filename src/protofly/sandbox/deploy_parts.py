"""Where a deploy's time in the process sandbox went, for the deploy timeline (``Step.parts``).

The runtime times what it does itself (writing the stub's cgroup limits, the ``create`` round trip); the
host times its confinement and the stub's code start and puts them in its ``create`` answer.  The stub's
code shares the host's process, so the host's figures are taken only when they are plausible numbers,
shown and never acted on.
"""

from __future__ import annotations

from protofly.message import Message

__all__ = ["sandbox_parts"]


def sandbox_parts(limits: float, create: float, reply: Message) -> dict[str, float]:
    """The deploy's parts in ms; the host's own figures are taken only if they are sane numbers (the stub
    shares the host's process, so they are shown, never acted on)."""
    parts = {"limits": round(limits * 1000, 3)}
    value = (reply.body or {}).get("value")
    told = value.get("ms") if isinstance(value, dict) else None
    host = {}
    if isinstance(told, dict):
        for name in ("confine", "load"):
            ms = told.get(name)
            if isinstance(ms, int | float) and not isinstance(ms, bool) and 0 <= ms <= create * 1000:
                host[name] = float(ms)
    parts.update(host)
    parts["channel"] = round(max(create * 1000 - sum(host.values()), 0.0), 3)
    return parts
