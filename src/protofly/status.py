"""The protocol stub status machine (reTHINK ``protostub-state-machine``), sans I/O.

Two groups of states, owned by different actors:

* deployment, owned by the Runtime UA: ``deploying → deployed | deployment-failed``;
* connection, published by the stub: ``created → in-progress → live | failed``, ``live ⇄ disconnected``;
  ``live → expired`` is the runtime's when a ``live`` was not refreshed in time (its TTL), and the stub's
  next ``live`` (or the SDK's answer to a ping on its behalf) makes it ``live`` again.

The machine only says whether a reported value is a legal next state.  Illegal or unknown values are
returned as rejected transitions with a reason; the registry records them as anomalies instead of
letting a confused stub rewrite history.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CONNECTION",
    "DEPLOYMENT",
    "StatusMachine",
    "Transition",
    "normalize",
]

DEPLOYING = "deploying"
DEPLOYED = "deployed"
DEPLOYMENT_FAILED = "deployment-failed"
CREATED = "created"
IN_PROGRESS = "in-progress"
LIVE = "live"
FAILED = "failed"
DISCONNECTED = "disconnected"
EXPIRED = "expired"

DEPLOYMENT = frozenset({DEPLOYING, DEPLOYED, DEPLOYMENT_FAILED})
CONNECTION = frozenset({CREATED, IN_PROGRESS, LIVE, FAILED, DISCONNECTED, EXPIRED})

#: reTHINK peers' other spellings: legacy ``connected``, the P2P stubs' ``create``.
_SYNONYMS = {"connected": LIVE, "create": CREATED, "inprogress": IN_PROGRESS, "in_progress": IN_PROGRESS}

_DEPLOYMENT_NEXT: dict[str | None, frozenset[str]] = {
    None: frozenset({DEPLOYING}),
    DEPLOYING: frozenset({DEPLOYED, DEPLOYMENT_FAILED}),
    DEPLOYED: frozenset({DEPLOYING, DEPLOYMENT_FAILED}),
    DEPLOYMENT_FAILED: frozenset({DEPLOYING}),
}
# A stub may skip steps forward (the seed's own example publishes LIVE straight away), never go back to
# ``created``.  ``failed`` is final for a connection attempt except for a fresh ``in-progress`` retry.
_CONNECTION_NEXT: dict[str | None, frozenset[str]] = {
    None: frozenset({CREATED, IN_PROGRESS, LIVE, FAILED, DISCONNECTED}),
    CREATED: frozenset({IN_PROGRESS, LIVE, FAILED, DISCONNECTED}),
    IN_PROGRESS: frozenset({LIVE, FAILED, DISCONNECTED}),
    LIVE: frozenset({DISCONNECTED, FAILED, EXPIRED}),
    EXPIRED: frozenset({LIVE, IN_PROGRESS, DISCONNECTED, FAILED}),
    DISCONNECTED: frozenset({IN_PROGRESS, LIVE, FAILED}),
    FAILED: frozenset({IN_PROGRESS}),
}


def normalize(value: object) -> str | None:
    """Lower-case a status value and map synonyms; None if it is not a string at all."""
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    return _SYNONYMS.get(lowered, lowered)


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of reporting ``value``: applied or not, and why not."""

    group: str | None  # "deployment", "connection", or None for an unknown value
    old: str | None
    new: str
    applied: bool
    reason: str | None = None


class StatusMachine:
    """Current deployment and connection state of one stub."""

    __slots__ = ("connection", "deployment")

    def __init__(self) -> None:
        self.deployment: str | None = None
        self.connection: str | None = None

    @property
    def current(self) -> str | None:
        """What a user should see: a failed deployment first, then what the stub last said, then deployment."""
        if self.deployment == DEPLOYMENT_FAILED:
            return DEPLOYMENT_FAILED
        return self.connection or self.deployment

    def report(self, value: object) -> Transition:
        """Apply ``value`` if it is a legal next state of its group; otherwise return why not."""
        new = normalize(value)
        if new is None:
            return Transition(None, None, repr(value), False, f"status value must be a string, got {value!r}")
        if new in DEPLOYMENT:
            return self._move("deployment", self.deployment, new, _DEPLOYMENT_NEXT)
        if new in CONNECTION:
            if self.deployment in (None, DEPLOYMENT_FAILED):
                reason = f"connection status before deployment ({self.deployment})"
                return Transition("connection", self.connection, new, False, reason)
            return self._move("connection", self.connection, new, _CONNECTION_NEXT)
        return Transition(None, None, new, False, f"unknown status value {new!r}")

    def _move(self, group: str, old: str | None, new: str, table: dict[str | None, frozenset[str]]) -> Transition:
        if old == new:
            return Transition(group, old, new, False, "repeated")
        if new not in table[old]:
            return Transition(group, old, new, False, f"{old or 'nothing'} → {new} is not allowed")
        setattr(self, group, new)
        if group == "deployment" and new == DEPLOYING:
            self.connection = None  # a new deployment starts a new connection life
        return Transition(group, old, new, True)
