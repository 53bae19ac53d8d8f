"""Limits, the boundary rule on `from`, exit reasons, and the sandbox factory."""

from __future__ import annotations

import signal

import pytest

from protofly.sandbox import DEFAULT_LIMITS, Boundary, DeployError, LimitError, Limits, SandboxLimits, create_sandbox
from protofly.sandbox.guard import Guard, failed_status, forgery
from protofly.sandbox.proctree import describe_exit

RUNTIME = "hyperty-runtime://a.test/r1"
STUB = f"{RUNTIME}/protostub/1"


def boundary(stub_domain: str = "b.test", is_local=None) -> Boundary:
    return Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain=stub_domain, is_local=is_local)


# -- Limits ------------------------------------------------------------------------------------------


def test_narrowed_takes_the_minimum_per_field_and_ignores_raises():
    limits = Limits(memory_mb=512, cpu_seconds=60, open_files=64)
    assert limits.narrowed(SandboxLimits(memory_mb=128, cpu_seconds=600)) == Limits(128, 60, 64)
    assert limits.narrowed(SandboxLimits(open_files=10_000)) == limits
    assert limits.narrowed(None) is limits
    assert limits.narrowed(SandboxLimits()) is limits


@pytest.mark.parametrize(
    ("memory", "files"), [("memoryMB", "openFiles"), ("memoryMb", "openFiles"), ("memory_mb", "open_files")]
)
def test_a_request_decodes_from_every_documented_spelling(memory, files):
    request = SandboxLimits.from_wire({memory: 100, files: 8})
    assert request == SandboxLimits(memory_mb=100, open_files=8)
    assert Limits(memory_mb=512, cpu_seconds=60, open_files=64).narrowed(request) == Limits(100, 60, 8)


def test_two_spellings_of_one_limit_give_the_lower():
    assert SandboxLimits.from_wire({"memoryMB": 100, "memory_mb": 90}) == SandboxLimits(memory_mb=90)


@pytest.mark.parametrize("value", [0, -5, "128", 1.5, True, None, 1 << 30])
def test_a_bad_request_names_the_key_as_written(value):
    with pytest.raises(LimitError, match=r"^sandbox\.memoryMB: ") as caught:
        SandboxLimits.from_wire({"memoryMB": value})
    assert caught.value.field == "sandbox.memoryMB"
    if value is not None:  # None is "no request" when built directly
        with pytest.raises(ValueError, match=r"^sandbox\.memory_mb: "):
            SandboxLimits(memory_mb=value)


def test_an_unknown_limit_is_refused_not_ignored():
    with pytest.raises(LimitError, match="sandbox.egress: unknown limit"):
        SandboxLimits.from_wire({"memoryMB": 100, "egress": ["msg-node.b.test:443"]})


def test_a_request_must_be_an_object():
    with pytest.raises(LimitError, match="^sandbox: expected an object"):
        SandboxLimits.from_wire([("memory_mb", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SandboxLimits"):
        DEFAULT_LIMITS.narrowed({"memory_mb": 1})  # type: ignore[arg-type]


def test_limits_travel_to_the_host_and_back():
    limits = Limits(memory_mb=128, cpu_seconds=60, open_files=64)
    assert Limits.from_dict(limits.as_dict()) == limits
    with pytest.raises(ValueError, match="limits.open_files"):
        Limits.from_dict({"memory_mb": 128, "cpu_seconds": 60})
    with pytest.raises(ValueError, match="limits.swap_mb: unknown"):
        Limits.from_dict({**limits.as_dict(), "swap_mb": 1})


def test_limits_must_be_positive_integers():
    with pytest.raises(ValueError, match="limits.cpu_seconds"):
        Limits(memory_mb=1, cpu_seconds=0, open_files=1)


# -- the boundary ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    [STUB, f"{STUB}/status", "hyperty://b.test/alice", "domain://msg-node.b.test/sm", "xmpp://bob@b.test"],
)
def test_the_stub_may_use_its_own_addresses_and_those_of_its_domain(sender):
    assert forgery(boundary(), STUB, sender) is None


@pytest.mark.parametrize("sender", ["hyperty://c.test/carol", "domain://msg-node.c.test/registry", "mn:/session"])
def test_a_foreign_stub_may_not_speak_for_a_third_domain(sender):
    assert "does not serve" in (forgery(boundary(), STUB, sender) or "")


def test_the_home_stub_may_relay_other_domains_senders():
    assert forgery(boundary(stub_domain="a.test"), STUB, "hyperty://c.test/carol") is None


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        (RUNTIME, "address within the runtime"),
        (f"{RUNTIME}/registry", "address within the runtime"),
        (f"{RUNTIME}/protostub/2", "address within the runtime"),
        (f"{STUB}/other", "address within the runtime"),
        ("hyperty-runtime://sandbox/external", "sandbox control address"),
        ("hyperty://a.test/x", "address of the runtime's domain a.test"),
        ("domain://registry.a.test", "address of the runtime's domain a.test"),
        ("not an address", "not a valid address"),
    ],
)
def test_addresses_of_the_runtime_are_forged(sender, reason):
    assert forgery(boundary(), STUB, sender) == reason


def test_is_local_catches_local_components_outside_the_runtime_url():
    local = {"hyperty://c.test/local-hyperty"}
    assert forgery(boundary(is_local=local.__contains__), STUB, "hyperty://c.test/local-hyperty") == (
        "address of a local component"
    )


def test_a_stub_of_the_runtime_s_own_domain_may_use_that_domain():
    assert forgery(boundary(stub_domain="a.test"), STUB, "hyperty://a.test/remote-alice") is None


def test_the_guard_drops_and_counts_forgeries_and_passes_the_rest():
    from protofly.message import Message

    received = []
    guard = Guard(STUB, boundary(), received.append)
    guard.from_stub(Message(type="create", from_="hyperty://a.test/x", to="hyperty://b.test/y"))
    guard.from_stub(Message(type="create", from_="hyperty://b.test/y", to="hyperty://a.test/x"))
    assert guard.counters["forged_from"] == 1
    assert guard.counters["messages_from_stub"] == 2
    assert [m.from_ for m in received] == ["hyperty://b.test/y"]


def test_the_guard_survives_a_failing_on_message():
    from protofly.message import Message

    def broken(msg):
        raise RuntimeError("runtime bug")

    guard = Guard(STUB, boundary(), broken)
    guard.from_stub(Message(type="create", from_=STUB, to="hyperty://a.test/x"))
    assert guard.counters["messages_from_stub"] == 1


def test_the_failed_status_has_the_status_shape():
    status = failed_status(STUB, "killed by SIGKILL")
    assert (status.type, status.from_, status.to) == ("update", STUB, f"{STUB}/status")
    assert status.body == {"value": "failed", "description": "killed by SIGKILL"}


# -- exit reasons ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "bwrap", "reason"),
    [
        (-signal.SIGKILL, False, "killed by SIGKILL"),
        (-signal.SIGXCPU, False, "CPU limit exceeded (SIGXCPU)"),
        (128 + signal.SIGXCPU, True, "CPU limit exceeded (SIGXCPU)"),
        (128 + signal.SIGKILL, True, "killed by SIGKILL"),
        (128 + signal.SIGKILL, False, "exit code 137"),
        (86, False, "memory limit (MemoryError)"),
        (3, True, "exit code 3"),
        (0, False, "exit code 0"),
    ],
)
def test_exit_reasons(code, bwrap, reason):
    assert describe_exit(code, bwrap=bwrap) == reason


# -- factory and errors ------------------------------------------------------------------------------


def test_create_sandbox_names_the_kinds():
    assert create_sandbox("process").kind == "process"
    assert create_sandbox("in-process").kind == "in-process"
    with pytest.raises(ValueError, match="'process' or 'in-process'"):
        create_sandbox("docker")


def test_deploy_error_carries_its_summary():
    error = DeployError("SyntaxError: invalid syntax (stub.py, line 3)")
    assert error.summary == str(error) == "SyntaxError: invalid syntax (stub.py, line 3)"
