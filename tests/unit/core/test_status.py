"""The status machine, without any I/O."""

from __future__ import annotations

import pytest

from protofly.status import StatusMachine, normalize


def test_normalize() -> None:
    assert normalize("LIVE") == "live"
    assert normalize(" Connected ") == "live"
    assert normalize("create") == "created"
    assert normalize(3) is None


def test_full_happy_path() -> None:
    machine = StatusMachine()
    for value in ["deploying", "created", "deployed", "in-progress", "live", "disconnected", "live"]:
        assert machine.report(value).applied, value
    assert machine.current == "live"
    assert (machine.deployment, machine.connection) == ("deployed", "live")


def test_stub_may_skip_forward_like_the_seed_example() -> None:
    machine = StatusMachine()
    machine.report("deploying")
    assert machine.report("LIVE").applied
    assert machine.current == "live"


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (["deploying", "created", "live"], "created"),
        (["deploying", "live"], "in-progress"),
        (["deploying", "deployed"], "deployed"),
        ([], "live"),
        (["deploying", "deployment-failed"], "live"),
        (["deploying", "created", "failed"], "live"),
        (["deploying"], "bogus"),
        (["deploying"], 42),
    ],
)
def test_disallowed_transitions_are_not_applied(path: list[str], bad: object) -> None:
    machine = StatusMachine()
    for value in path:
        assert machine.report(value).applied
    before = (machine.deployment, machine.connection)
    transition = machine.report(bad)
    assert not transition.applied
    assert transition.reason
    assert (machine.deployment, machine.connection) == before


def test_redeploy_starts_a_new_connection_life() -> None:
    machine = StatusMachine()
    for value in ["deploying", "deployed", "live", "failed", "deploying"]:
        assert machine.report(value).applied, value
    assert machine.connection is None
    assert machine.current == "deploying"
    assert machine.report("created").applied


def test_failed_deployment_wins_over_connection() -> None:
    machine = StatusMachine()
    for value in ["deploying", "created", "in-progress", "deployment-failed"]:
        assert machine.report(value).applied
    assert machine.current == "deployment-failed"


def test_live_expires_and_a_refresh_makes_it_live_again() -> None:
    machine = StatusMachine()
    for value in ("deploying", "deployed", "live"):
        assert machine.report(value).applied
    assert machine.report("expired").applied
    assert machine.current == "expired"
    assert machine.report("live").applied
    assert machine.report("live").reason == "repeated"  # a refresh of a live status changes nothing here


@pytest.mark.parametrize("before", ["created", "in-progress", "disconnected", "failed"])
def test_only_a_live_status_can_expire(before: str) -> None:
    machine = StatusMachine()
    machine.report("deploying")
    machine.report(before)
    transition = machine.report("expired")
    assert not transition.applied and transition.reason
    assert machine.current == before


@pytest.mark.parametrize("after", ["in-progress", "disconnected", "failed"])
def test_an_expired_stub_may_go_anywhere_a_live_one_may(after: str) -> None:
    machine = StatusMachine()
    for value in ("deploying", "live", "expired", after):
        assert machine.report(value).applied, value
