"""The stub lifecycle without processes or sleeps: a fake clock and a fake random source drive every path."""

from __future__ import annotations

import math

import pytest

from protofly.catalogue.errors import E_DIGEST, E_FETCH, E_SIGNATURE
from protofly.supervision import (
    TRANSITIONS,
    AnswerQueued,
    CancelDeploy,
    Crashed,
    Deployed,
    DeployFailed,
    DeployStarted,
    Enqueue,
    Failure,
    FlushQueue,
    Forward,
    GaveUp,
    Incoming,
    Phase,
    Policy,
    Refuse,
    Reject,
    RestartScheduled,
    RetryNow,
    StartDeploy,
    StubLifecycle,
    Trigger,
    Unload,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def top(low: float, high: float) -> float:
    """A 'random' source that always picks the ceiling, so delays are exact."""
    return high


def machine(clock: Clock | None = None, **policy: float) -> tuple[StubLifecycle, Clock]:
    clock = clock or Clock()
    settings = {
        "backoff_base": 0.25,
        "backoff_cap": 30.0,
        "crash_budget": 3,
        "crash_window": 300.0,
        "stable_after": 60.0,
    }
    settings.update(policy)
    lifecycle = StubLifecycle("b.test", Policy(**settings), clock=clock, uniform=top)  # type: ignore[arg-type]
    return lifecycle, clock


def live(lifecycle: StubLifecycle) -> None:
    lifecycle.handle(Trigger())
    assert lifecycle.handle(Deployed()) == [FlushQueue()]
    assert lifecycle.phase is Phase.LIVE


def test_a_message_before_any_stub_starts_a_deployment_and_waits_for_it() -> None:
    lifecycle, _ = machine()
    assert lifecycle.handle(Incoming()) == [StartDeploy(), Enqueue()]
    assert lifecycle.phase is Phase.DEPLOYING
    assert lifecycle.handle(Incoming()) == [Enqueue()]  # one deployment, shared
    assert lifecycle.handle(Trigger()) == []
    assert lifecycle.handle(Deployed()) == [FlushQueue()]
    assert lifecycle.handle(Incoming()) == [Forward()]


def test_a_transient_failure_answers_the_waiting_and_retries_only_after_the_backoff() -> None:
    lifecycle, clock = machine()
    lifecycle.handle(Incoming())
    failure = Failure(503, "catalogue unreachable", E_FETCH)
    assert lifecycle.handle(DeployFailed(failure)) == [AnswerQueued(503, "catalogue unreachable")]
    assert lifecycle.phase is Phase.FAILED_RETRYABLE
    assert lifecycle.retry_at == pytest.approx(clock.now + 0.25)
    assert lifecycle.handle(Incoming()) == [Reject(503, "catalogue unreachable")]
    assert lifecycle.handle(Trigger()) == [Refuse(failure)]
    clock.now += 0.25
    assert lifecycle.handle(Incoming()) == [StartDeploy(), Enqueue()]
    # the second failure backs off twice as long
    lifecycle.handle(DeployFailed(failure))
    assert lifecycle.retry_at == pytest.approx(clock.now + 0.5)


@pytest.mark.parametrize("cause", [E_DIGEST, E_SIGNATURE])
def test_a_verification_failure_is_never_retried_by_itself(cause: str) -> None:
    lifecycle, clock = machine()
    lifecycle.handle(Trigger())
    lifecycle.handle(DeployFailed(Failure(503, "bad bytes", cause)))
    assert lifecycle.phase is Phase.FAILED_PERMANENT and lifecycle.retry_at == math.inf
    clock.now += 1e9
    assert lifecycle.handle(Incoming()) == [Reject(503, "bad bytes")]
    assert lifecycle.handle(RetryNow()) == [StartDeploy(refresh=True)]
    assert lifecycle.phase is Phase.DEPLOYING


def test_a_crash_restarts_with_growing_backoff_until_the_budget_is_spent() -> None:
    lifecycle, clock = machine()
    live(lifecycle)
    assert lifecycle.handle(Crashed("killed by SIGKILL")) == [
        RestartScheduled("killed by SIGKILL", 0.25),
        StartDeploy(delay=0.25),
    ]
    assert lifecycle.phase is Phase.BACKOFF
    assert lifecycle.handle(Incoming()) == [Enqueue()]  # held across the restart
    assert lifecycle.handle(DeployStarted()) == []
    assert lifecycle.handle(Deployed()) == [FlushQueue()]
    clock.now += 1
    assert lifecycle.handle(Crashed("exit 1"))[1] == StartDeploy(delay=0.5)
    lifecycle.handle(DeployStarted())
    lifecycle.handle(Deployed())
    actions = lifecycle.handle(Crashed("exit 1"))
    assert actions[0] == GaveUp("exit 1", 3)
    assert isinstance(actions[1], AnswerQueued) and "crashed 3 times" in actions[1].description
    assert lifecycle.phase is Phase.FAILED_PERMANENT and lifecycle.restarts == 2
    assert lifecycle.handle(RetryNow()) == [StartDeploy(refresh=True)]
    assert lifecycle.crashes == 0


def test_crashes_outside_the_window_do_not_count_and_a_stable_stub_backs_off_from_the_base() -> None:
    lifecycle, clock = machine(crash_window=10.0, stable_after=5.0)
    live(lifecycle)
    for _ in range(5):
        actions = lifecycle.handle(Crashed("exit 1"))
        assert actions[-1] == StartDeploy(delay=0.25)  # stable for 20 s each time: back to the base
        lifecycle.handle(DeployStarted())
        lifecycle.handle(Deployed())
        clock.now += 20
    assert lifecycle.crashes == 1


def test_a_restart_that_fails_counts_as_another_crash() -> None:
    lifecycle, _ = machine()
    live(lifecycle)
    lifecycle.handle(Crashed("exit 1"))
    lifecycle.handle(DeployStarted())
    actions = lifecycle.handle(DeployFailed(Failure(503, "stub failed to start", None)))
    assert actions == [AnswerQueued(503, "stub failed to start"), RestartScheduled("stub failed to start", 0.5),
                       StartDeploy(delay=0.5)]  # fmt: skip
    assert lifecycle.crashes == 2


def test_unload_during_a_deployment_cancels_it_and_answers_everyone() -> None:
    lifecycle, _ = machine()
    lifecycle.handle(Incoming())
    actions = lifecycle.handle(Unload("stub unloaded"))
    assert actions == [CancelDeploy(), AnswerQueued(503, "stub for b.test: stub unloaded")]
    assert lifecycle.phase is Phase.UNLOADED
    assert lifecycle.handle(Incoming()) == [Reject(503, "stub for b.test: stub unloaded")]
    assert lifecycle.handle(Deployed()) == []  # a late outcome changes nothing
    assert isinstance(lifecycle.handle(Trigger())[0], Refuse)


def test_retry_now_during_a_deployment_or_backoff_cancels_and_starts_fresh() -> None:
    lifecycle, _ = machine()
    lifecycle.handle(Trigger())
    assert lifecycle.handle(RetryNow()) == [CancelDeploy(), StartDeploy(refresh=True)]
    lifecycle.handle(Deployed())
    lifecycle.handle(Crashed("exit 1"))
    assert lifecycle.handle(RetryNow()) == [CancelDeploy(), StartDeploy(refresh=True)]


def test_a_crash_while_deploying_is_left_to_the_deployment() -> None:
    lifecycle, _ = machine()
    lifecycle.handle(Trigger())
    assert lifecycle.handle(Crashed("exit 1")) == []
    assert lifecycle.phase is Phase.DEPLOYING


def test_every_transition_names_a_phase_and_an_event_the_machine_knows() -> None:
    handled = {phase for phase, _ in TRANSITIONS}
    assert Phase.UNLOADED not in handled  # handled before the table: nothing leaves it
    assert handled == set(Phase) - {Phase.UNLOADED, Phase.EXPIRED}


def test_a_failed_restart_that_spends_the_budget_answers_the_queue_once_with_the_crash_loop() -> None:
    lifecycle, _ = machine(crash_budget=2)
    live(lifecycle)
    lifecycle.handle(Crashed("exit 1"))
    lifecycle.handle(DeployStarted())
    actions = lifecycle.handle(DeployFailed(Failure(503, "stub failed to start", None)))
    answers = [a for a in actions if isinstance(a, AnswerQueued)]
    assert len(answers) == 1 and "crashed 2 times" in answers[0].description
    assert lifecycle.phase is Phase.FAILED_PERMANENT


def test_credentials_refused_by_the_server_wait_for_retry_now_and_never_loop() -> None:
    lifecycle, clock = machine()
    lifecycle.handle(Incoming())
    refused = Failure(401, "credentials refused: not authorized", "auth")
    assert lifecycle.handle(DeployFailed(refused)) == [AnswerQueued(401, "credentials refused: not authorized")]
    assert lifecycle.phase is Phase.AUTH_FAILED
    clock.now += 1e9
    assert lifecycle.handle(Incoming()) == [Reject(401, "credentials refused: not authorized")]
    assert lifecycle.handle(Trigger()) == [Refuse(refused)]
    assert lifecycle.handle(RetryNow()) == [StartDeploy(refresh=True)]
    lifecycle.handle(Deployed())
    lifecycle.handle(Crashed("exit 1"))
    lifecycle.handle(DeployStarted())
    lifecycle.handle(DeployFailed(refused))  # the server revoked the credentials while it was live
    assert lifecycle.phase is Phase.AUTH_FAILED
