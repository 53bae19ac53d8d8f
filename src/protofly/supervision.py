"""The Runtime UA's stub lifecycle, without I/O: one machine per domain, driven by events, returning actions.

Everything the Runtime UA decides about a domain's stub — deploy now or later, queue or forward a
message, answer the waiting senders, restart after a crash, give up after too many — is decided here, in a
plain class with an injected clock and random source.  The runtime (:mod:`protofly.runtime`) is a thin
shell that feeds it events (a message arrived, a deployment ended, the process died, a user asked to
retry or unload) and performs the actions it returns.  Unit tests drive backoff, the crash budget,
``retry_now``, unloading during a deployment and every class of failure in milliseconds.

The phases and what moves between them (``TRANSITIONS`` is the whole table)::

    idle ──trigger──▶ deploying ──deployed──▶ live ──crashed──▶ backoff ──started──▶ deploying
                         │  ▲                                    (crash budget spent: failed-permanent)
             deploy_failed  │ retry / trigger after retry_at
                         ▼  │
            failed-retryable | failed-permanent (verification failures, crash loops)
    any ──unload──▶ unloaded (final)

``auth-failed``: the back-end refused the credentials (the stub's ``connect`` raised
``AuthenticationFailed``); nothing retries until ``retry_now`` (after ``Runtime.set_credentials``).
``expired`` is reserved for a status that was not refreshed in time; nothing enters it yet.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protofly.backoff import Backoff, Uniform
from protofly.catalogue.errors import E_CHANGED, E_DIGEST, E_ROLLBACK, E_SIGNATURE, E_UNSIGNED, E_UNTRUSTED

__all__ = [
    "AUTH_FAILURE",
    "PERMANENT_FAILURES",
    "REQUIREMENTS_FAILURE",
    "TRANSITIONS",
    "VERIFICATION_FAILURES",
    "Action",
    "AnswerQueued",
    "CancelDeploy",
    "Crashed",
    "DeployFailed",
    "DeployStarted",
    "Deployed",
    "Enqueue",
    "Event",
    "Failure",
    "FlushQueue",
    "Forward",
    "GaveUp",
    "Incoming",
    "Phase",
    "Policy",
    "Refuse",
    "Reject",
    "RestartScheduled",
    "RetryNow",
    "StartDeploy",
    "StubLifecycle",
    "Trigger",
    "Unload",
]

#: The back-end refused the credentials: retrying with the same ones would only be refused again.
AUTH_FAILURE = "auth"

#: The stub needs Python packages the sandbox's environment does not have: installing them is an operator's job.
REQUIREMENTS_FAILURE = "requirements"

#: Catalogue failures that another attempt cannot fix: the bytes or the keys are wrong, not the network.
VERIFICATION_FAILURES = frozenset({E_DIGEST, E_SIGNATURE, E_UNTRUSTED, E_UNSIGNED, E_ROLLBACK, E_CHANGED})
#: Failures no automatic retry can fix; only ``retry_now`` tries again.
PERMANENT_FAILURES = VERIFICATION_FAILURES | {REQUIREMENTS_FAILURE}


class Phase(enum.Enum):
    IDLE = "idle"
    DEPLOYING = "deploying"
    LIVE = "live"
    BACKOFF = "backoff"
    FAILED_RETRYABLE = "failed-retryable"
    FAILED_PERMANENT = "failed-permanent"
    AUTH_FAILED = "auth-failed"
    EXPIRED = "expired"
    UNLOADED = "unloaded"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the stub is not live: the code and text every waiting or later sender gets."""

    code: int
    description: str
    cause: str | None = None

    @property
    def permanent(self) -> bool:
        return self.cause in PERMANENT_FAILURES


@dataclass(frozen=True, slots=True)
class Policy:
    """The supervision knobs (from :class:`protofly.config.RuntimeConfig`)."""

    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    crash_budget: int = 5
    crash_window: float = 300.0
    stable_after: float = 60.0


# -- events -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trigger:
    """An explicit deploy (``load_stub``): deploy unless live or deploying; refused while failed."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message for the stub arrived at its port (the implicit trigger)."""


@dataclass(frozen=True, slots=True)
class DeployStarted:
    """A scheduled (delayed) deployment has begun its work."""


@dataclass(frozen=True, slots=True)
class Deployed:
    """The deployment ended with the stub ``live``."""


@dataclass(frozen=True, slots=True)
class DeployFailed:
    failure: Failure


@dataclass(frozen=True, slots=True)
class Crashed:
    """The stub's process ended (reason from the OS)."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryNow:
    """Forget crashes and backoff; deploy again now, fresh from the catalogue."""


@dataclass(frozen=True, slots=True)
class Unload:
    reason: str


Event = Trigger | Incoming | DeployStarted | Deployed | DeployFailed | Crashed | RetryNow | Unload


# -- actions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartDeploy:
    """Start a deployment task after ``delay`` seconds (``refresh``: revalidate with the catalogue)."""

    delay: float = 0.0
    refresh: bool = False


@dataclass(frozen=True, slots=True)
class CancelDeploy:
    """Cancel the deployment task in flight (and remove what it started)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Hand the incoming message to the live stub."""


@dataclass(frozen=True, slots=True)
class Enqueue:
    """Hold the incoming message in the port until the stub is live."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the incoming message with an error now."""

    code: int
    description: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Fail the explicit trigger (``load_stub``) with this failure."""

    failure: Failure


@dataclass(frozen=True, slots=True)
class FlushQueue:
    """Forward every held message, in order."""


@dataclass(frozen=True, slots=True)
class AnswerQueued:
    """Answer every held message with an error."""

    code: int
    description: str


@dataclass(frozen=True, slots=True)
class RestartScheduled:
    """A crash will be followed by a restart in ``delay`` seconds (tell observers)."""

    reason: str
    delay: float


@dataclass(frozen=True, slots=True)
class GaveUp:
    """The crash budget is spent (tell observers)."""

    reason: str
    crashes: int


Action = (
    StartDeploy
    | CancelDeploy
    | Forward
    | Enqueue
    | Reject
    | Refuse
    | FlushQueue
    | AnswerQueued
    | RestartScheduled
    | GaveUp
)


# -- the machine ------------------------------------------------------------------------------------------


class StubLifecycle:
    """The supervision state of one domain's stub; ``handle(event)`` returns what the shell must do."""

    def __init__(
        self,
        domain: str,
        policy: Policy,
        *,
        clock: Callable[[], float],
        uniform: Uniform,
    ) -> None:
        self.domain = domain
        self.policy = policy
        self.phase = Phase.IDLE
        self.failure: Failure | None = None
        self.retry_at = 0.0
        self.restarts = 0
        self._clock = clock
        self._backoff = Backoff(policy.backoff_base, policy.backoff_cap, uniform)
        self._crashes: deque[float] = deque(maxlen=policy.crash_budget)
        self._live_since: float | None = None
        self._supervised = False  # went live once: from then on failures are restarted automatically

    @property
    def crashes(self) -> int:
        """Crashes counted against the budget (within the window as of the last one)."""
        return len(self._crashes)

    def handle(self, event: Event) -> list[Action]:
        """Apply ``event``; the returned actions are to be performed in order."""
        if self.phase is Phase.UNLOADED:
            return self._after_unload(event)
        handler = TRANSITIONS.get((self.phase, type(event)))
        if handler is None:
            return []
        return handler(self, event)

    # -- handlers (named by phase and event) -----------------------------------------------------------

    def _deploy(self, _event: Event) -> list[Action]:
        self.phase = Phase.DEPLOYING
        return [StartDeploy()]

    def _deploy_and_hold(self, _event: Event) -> list[Action]:
        self.phase = Phase.DEPLOYING
        return [StartDeploy(), Enqueue()]

    def _hold(self, _event: Event) -> list[Action]:
        return [Enqueue()]

    def _forward(self, _event: Event) -> list[Action]:
        return [Forward()]

    def _started(self, _event: Event) -> list[Action]:
        self.phase = Phase.DEPLOYING
        return []

    def _live(self, _event: Event) -> list[Action]:
        self.phase = Phase.LIVE
        self.failure = None
        self._supervised = True
        self._live_since = self._clock()
        return [FlushQueue()]

    def _deploy_failed(self, event: Event) -> list[Action]:
        assert isinstance(event, DeployFailed)
        failure = event.failure
        self.failure = failure
        actions: list[Action] = [AnswerQueued(failure.code, failure.description)]
        if failure.cause == AUTH_FAILURE:
            self.phase = Phase.AUTH_FAILED  # until new credentials and retry_now(): no loop against a "no"
            self.retry_at = math.inf
            return actions
        if failure.permanent:
            self.phase = Phase.FAILED_PERMANENT
            self.retry_at = math.inf  # the same bytes will fail the same way: only retry_now() tries again
            return actions
        if self._supervised:  # a restart that failed counts as another crash
            restart = self._restart_or_give_up(failure.description)
            return restart if self.phase is Phase.FAILED_PERMANENT else actions + restart
        self.phase = Phase.FAILED_RETRYABLE
        self.retry_at = self._clock() + self._backoff.next()
        return actions

    def _crashed(self, event: Event) -> list[Action]:
        assert isinstance(event, Crashed)
        return self._restart_or_give_up(event.reason)

    def _retry_if_due(self, event: Event) -> list[Action]:
        if self._clock() < self.retry_at:
            failure = self.failure or Failure(503, f"stub for {self.domain} is failed")
            if isinstance(event, Incoming):
                return [Reject(failure.code, failure.description)]
            return [Refuse(failure)]
        self.phase = Phase.DEPLOYING
        return [StartDeploy(), Enqueue()] if isinstance(event, Incoming) else [StartDeploy()]

    def _retry_now(self, _event: Event) -> list[Action]:
        cancel: list[Action] = [CancelDeploy()] if self.phase in (Phase.DEPLOYING, Phase.BACKOFF) else []
        self._crashes.clear()
        self._backoff.reset()
        self.failure = None
        self.retry_at = 0.0
        self.phase = Phase.DEPLOYING
        return [*cancel, StartDeploy(refresh=True)]

    def _unload(self, event: Event) -> list[Action]:
        assert isinstance(event, Unload)
        cancel: list[Action] = [CancelDeploy()] if self.phase in (Phase.DEPLOYING, Phase.BACKOFF) else []
        self.phase = Phase.UNLOADED
        self.failure = Failure(503, f"stub for {self.domain}: {event.reason}")
        return [*cancel, AnswerQueued(503, self.failure.description)]

    def _after_unload(self, event: Event) -> list[Action]:
        failure = self.failure or Failure(503, f"stub for {self.domain} was unloaded")
        if isinstance(event, Incoming):
            return [Reject(failure.code, failure.description)]
        if isinstance(event, Trigger):
            return [Refuse(failure)]
        return []

    # -- crash accounting ------------------------------------------------------------------------------

    def _restart_or_give_up(self, reason: str) -> list[Action]:
        now = self._clock()
        policy = self.policy
        if self._live_since is not None and now - self._live_since >= policy.stable_after:
            self._backoff.reset()  # it had been fine for a while: start the backoff from its base again
        self._live_since = None
        while self._crashes and now - self._crashes[0] > policy.crash_window:
            self._crashes.popleft()
        self._crashes.append(now)
        if len(self._crashes) >= policy.crash_budget:
            description = (
                f"stub crashed {len(self._crashes)} times in {policy.crash_window:g} s (last: {reason}); "
                "it stays failed until retry_now()"
            )
            self.phase = Phase.FAILED_PERMANENT
            self.failure = Failure(503, description, cause="crash-loop")
            self.retry_at = math.inf
            return [GaveUp(reason, len(self._crashes)), AnswerQueued(503, description)]
        delay = self._backoff.next()
        self.restarts += 1
        self.phase = Phase.BACKOFF
        return [RestartScheduled(reason, delay), StartDeploy(delay=delay)]


_Handler = Callable[[StubLifecycle, Event], list[Action]]

#: (phase, event type) → what happens; a pair that is missing means "nothing to do".
TRANSITIONS: dict[tuple[Phase, type], _Handler] = {
    (Phase.IDLE, Trigger): StubLifecycle._deploy,
    (Phase.IDLE, Incoming): StubLifecycle._deploy_and_hold,
    (Phase.IDLE, RetryNow): StubLifecycle._retry_now,
    (Phase.IDLE, Unload): StubLifecycle._unload,
    (Phase.DEPLOYING, Incoming): StubLifecycle._hold,
    (Phase.DEPLOYING, Deployed): StubLifecycle._live,
    (Phase.DEPLOYING, DeployFailed): StubLifecycle._deploy_failed,
    (Phase.DEPLOYING, RetryNow): StubLifecycle._retry_now,
    (Phase.DEPLOYING, Unload): StubLifecycle._unload,
    (Phase.BACKOFF, Incoming): StubLifecycle._hold,
    (Phase.BACKOFF, DeployStarted): StubLifecycle._started,
    (Phase.BACKOFF, RetryNow): StubLifecycle._retry_now,
    (Phase.BACKOFF, Unload): StubLifecycle._unload,
    (Phase.LIVE, Incoming): StubLifecycle._forward,
    (Phase.LIVE, Crashed): StubLifecycle._crashed,
    (Phase.LIVE, Unload): StubLifecycle._unload,
    (Phase.FAILED_RETRYABLE, Incoming): StubLifecycle._retry_if_due,
    (Phase.FAILED_RETRYABLE, Trigger): StubLifecycle._retry_if_due,
    (Phase.FAILED_RETRYABLE, RetryNow): StubLifecycle._retry_now,
    (Phase.FAILED_RETRYABLE, Unload): StubLifecycle._unload,
    (Phase.FAILED_PERMANENT, Incoming): StubLifecycle._retry_if_due,
    (Phase.FAILED_PERMANENT, Trigger): StubLifecycle._retry_if_due,
    (Phase.FAILED_PERMANENT, RetryNow): StubLifecycle._retry_now,
    (Phase.FAILED_PERMANENT, Unload): StubLifecycle._unload,
    (Phase.AUTH_FAILED, Incoming): StubLifecycle._retry_if_due,
    (Phase.AUTH_FAILED, Trigger): StubLifecycle._retry_if_due,
    (Phase.AUTH_FAILED, RetryNow): StubLifecycle._retry_now,
    (Phase.AUTH_FAILED, Unload): StubLifecycle._unload,
}
