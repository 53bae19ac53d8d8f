"""ProcessSandbox with real host processes: round trips, isolation, limits, boundary, failures."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
from tests.integration.sandbox.sandbox_helpers import (
    MODES,
    RUNTIME,
    URL,
    Inbox,
    all_ended,
    deploy,
    needs_bwrap,
    request,
    running_or_ours,
    tree,
)
from tests.polling import wait_until

import protofly
from protofly.message import Message
from protofly.sandbox import DeployError, Limits, SandboxError
from protofly.sandbox.isolation import host_env
from protofly.sandbox.process import ProcessSandbox

PACKAGE = Path(protofly.__file__).resolve().parent


def make_secret(directory: Path) -> Path:
    secret = directory / "secret.txt"
    secret.write_text("runtime secret")
    return secret


def exists(path: str) -> bool:
    return Path(path).exists()


def read_or_empty(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
async def test_echo_round_trip_with_layers_recorded(sandbox):
    inbox = Inbox()
    limits = Limits(memory_mb=400, cpu_seconds=30, open_files=100)
    component = await deploy(sandbox, "echo.py", inbox, classname="EchoStub", limits=limits)
    created = await inbox.status("created")
    assert (created.type, created.from_) == ("update", URL)
    component.post(request(1))
    component.post(request(2))
    replies = [await inbox.data(), await inbox.data()]
    assert [r.body["echo"] for r in replies] == [{"n": 1}, {"n": 2}]
    assert {r.body["via"] for r in replies} == {URL}
    assert replies[0].to == "hyperty://a.test/h"
    record = component.isolation
    assert record["process"] is True
    assert record["env"] == "scrubbed"
    assert record["rlimits"] == limits.as_dict()
    assert record["no_new_privs"] is True
    assert record["landlock"] and record["seccomp"]
    if sandbox.use_bwrap:
        # A root runtime's hosts drop to the sandbox user themselves (no user namespace); a user's have one.
        expected = ["pid", "ipc"] if os.geteuid() == 0 else ["user", "pid"]
        assert record["bwrap"]["namespaces"][:2] == expected
        assert record["user"]["host_uid"] != 0
        assert record["network"] == {"namespace": "own, no interface but loopback", "egress": []}
        assert record["missing"] == []
    else:
        assert record["bwrap"] is False
        assert "bwrap: disabled by configuration" in record["missing"]
        # No namespace, no network layer: said, never silent.
        assert record["network"] is False
        assert any(item.startswith("network namespace: none without bwrap") for item in record["missing"])
    assert component.counters["messages_to_stub"] == 2


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
async def test_the_runtime_s_environment_does_not_reach_the_stub(sandbox, monkeypatch):
    secret = "do-not-leak-7f3a9c"
    monkeypatch.setenv("PROTOFLY_TEST_SECRET", secret)
    inbox = Inbox()
    component = await deploy(sandbox, "env_reader.py", inbox, classname="EnvReader")
    component.post(request(1, {"name": "PROTOFLY_TEST_SECRET"}))
    seen = (await inbox.data()).body
    assert seen["value"] is None
    assert secret not in repr(seen["environ"])
    assert set(seen["environ"]) <= {*host_env("/tmp"), "PWD"}  # bwrap --chdir sets PWD to the sandbox's /tmp
    assert seen["environ"].get("PWD", "/tmp") == "/tmp"
    assert seen["cwd"] != os.getcwd()


async def test_a_stub_that_allocates_4_gib_is_stopped_by_the_memory_limit(sandbox):
    inbox = Inbox()
    component = await deploy(
        sandbox,
        "memory_hog.py",
        inbox,
        classname="MemoryHog",
        limits=Limits(memory_mb=256, cpu_seconds=60, open_files=64),
    )
    component.post(request(1))
    failed = await inbox.status("failed")
    assert failed.body["description"] == "memory limit (MemoryError)"
    await inbox.exited.wait()
    assert inbox.exits == ["memory limit (MemoryError)"]
    assert component.state == "exited"


async def test_a_stub_that_loops_forever_is_stopped_by_the_cpu_limit(sandbox):
    inbox = Inbox()
    component = await deploy(
        sandbox, "cpu_loop.py", inbox, classname="CpuLoop", limits=Limits(memory_mb=512, cpu_seconds=1, open_files=64)
    )
    component.post(request(1))
    failed = await inbox.status("failed", timeout=30)
    assert failed.body["description"] == "CPU limit exceeded (SIGXCPU)"
    assert inbox.exits == ["CPU limit exceeded (SIGXCPU)"]


async def test_a_forged_from_is_dropped_counted_and_logged(sandbox, caplog):
    caplog.set_level(logging.WARNING, logger="protofly")
    inbox = Inbox()
    forged = ["hyperty://a.test/x", f"{RUNTIME}/registry", "hyperty-runtime://sandbox/external"]
    component = await deploy(sandbox, "forger.py", inbox, classname="Forger", config={"forged": forged})
    component.post(request(1))
    honest = await inbox.data()
    assert honest.from_ == "hyperty://b.test/honest"
    assert component.counters["forged_from"] == 3
    logged = [r for r in caplog.records if r.getMessage() == "dropped a message with a forged from"]
    assert [r.sender for r in logged] == forged
    assert all(r.stub_url == URL for r in logged)
    assert inbox.queue.empty()


async def test_a_syntax_error_fails_the_deploy_with_that_error_and_leaves_no_process(sandbox):
    before = set(tree(os.getpid())[1:])
    code = b"from protofly.stub import ProtoStub\n\nclass Broken(ProtoStub:\n    pass\n"
    with pytest.raises(DeployError) as caught:
        await deploy(sandbox, "", Inbox(), code=code)
    assert caught.value.summary.startswith("SyntaxError: ")
    assert caught.value.summary.endswith("(stub.py, line 3)")
    leftovers = [pid for pid in set(tree(os.getpid())[1:]) - before if running_or_ours(pid)]
    assert leftovers == []


async def test_an_exception_in_activate_fails_the_deploy_with_its_summary(sandbox):
    with pytest.raises(DeployError, match=r"^RuntimeError: configuration has no message node url$"):
        await deploy(sandbox, "failing_activate.py", Inbox())


async def test_kill_9_of_the_sandbox_process_becomes_failed(sandbox):
    inbox = Inbox()
    component = await deploy(sandbox, "echo.py", inbox, classname="EchoStub")
    await inbox.status("created")
    os.kill(component.pid, signal.SIGKILL)
    failed = await inbox.status("failed")
    assert failed.from_ == URL and failed.to == f"{URL}/status"
    assert failed.body["description"] == "killed by SIGKILL"
    await inbox.exited.wait()
    assert inbox.exits == ["killed by SIGKILL"]
    with pytest.raises(SandboxError, match="not running"):
        await component.execute("connect", [None], timeout=1)
    component.post(request(1))
    assert component.counters["dropped_to_stub"] == 1


async def test_one_stub_crashing_leaves_the_others_running(sandbox):
    first, second = Inbox(), Inbox(f"{RUNTIME}/protostub/2")
    victim = await deploy(sandbox, "echo.py", first, classname="EchoStub")
    survivor = await deploy(sandbox, "echo.py", second, classname="EchoStub", url=second.url)
    os.kill(victim.pid, signal.SIGKILL)
    await first.exited.wait()
    survivor.post(request(5))
    assert (await second.data()).body["echo"] == {"n": 5}
    assert second.exits == []


@pytest.mark.parametrize("sandbox", MODES, indirect=True)
async def test_after_removal_no_process_is_left(sandbox):
    inbox = Inbox()
    component = await deploy(sandbox, "echo.py", inbox, classname="EchoStub")
    pids = tree(component.pid)
    assert len(pids) >= (3 if sandbox.use_bwrap else 1)
    await component.remove()
    await all_ended(pids)
    assert [pid for pid in pids if running_or_ours(pid)] == []
    assert inbox.exits == []  # a removal is not a failure
    assert component.state == "exited"


async def test_a_stub_that_ignores_disconnect_and_sigterm_is_killed(sandbox):
    component = await deploy(sandbox, "stubborn.py", Inbox(), classname="Stubborn")
    pids = tree(component.pid)
    await component.remove(grace=0.2)
    await all_ended(pids)
    assert [pid for pid in pids if running_or_ours(pid)] == []


async def test_close_removes_every_component_and_refuses_new_deploys(sandbox):
    components = [
        await deploy(
            sandbox, "echo.py", Inbox(f"{RUNTIME}/protostub/{n}"), classname="EchoStub", url=f"{RUNTIME}/protostub/{n}"
        )
        for n in (1, 2)
    ]
    pids = [pid for c in components for pid in tree(c.pid)]
    await sandbox.close()
    await all_ended(pids)
    assert [pid for pid in pids if running_or_ours(pid)] == []
    with pytest.raises(SandboxError, match="closed"):
        await deploy(sandbox, "echo.py", Inbox(), classname="EchoStub")


async def test_oversized_and_invalid_frames_are_dropped_and_counted(sandbox):
    inbox = Inbox()
    component = await deploy(sandbox, "raw_writer.py", inbox, classname="RawWriter", config={"oversized": 2 << 20})
    component.post(request(1))
    first, second = await inbox.data(), await inbox.data()
    assert [first.body, second.body] == [{"n": 1}, {"n": 2, "via": URL}]
    assert component.counters["oversized_frames"] == 1
    assert component.counters["invalid_frames"] == 2


async def test_credentials_never_reach_a_log(sandbox, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-pa55word"
    inbox = Inbox()
    component = await deploy(sandbox, "secretive.py", inbox, classname="Secretive")
    answer = await component.execute("connect", [{"user": "alice", "password": secret}], timeout=10)
    refused = "PermissionError: login refused by the message node for password ***"
    assert answer.body == {"code": 500, "description": refused}
    failed = await inbox.status("failed")
    assert failed.body["description"] == refused
    await component.remove()
    printed = [r for r in caplog.records if getattr(r, "stream", None) == "stdout"]
    assert [r.getMessage() for r in printed] == ["logging in with ***"]
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in repr(vars(record))


async def test_stub_output_is_logged_with_the_stub_url(sandbox, caplog):
    caplog.set_level(logging.INFO, logger="protofly")
    inbox = Inbox()
    component = await deploy(sandbox, "chatty.py", inbox, classname="Chatty")
    await inbox.status("created")
    await component.remove()
    lines = {(r.stream, r.getMessage(), r.levelname) for r in caplog.records if getattr(r, "stub_url", None) == URL}
    assert ("stdout", "hello from the stub", "INFO") in lines
    assert ("stderr", "a warning from the stub", "WARNING") in lines


async def test_execute_answers_404_and_500_and_times_out(sandbox):
    component = await deploy(sandbox, "activate_style.py", Inbox())
    assert (await component.execute("ping", ["x"], timeout=10)).body == {"code": 200, "value": "pong x"}
    assert (await component.execute("fly", [], timeout=10)).body["code"] == 404
    missing_argument = await component.execute("ping", [], timeout=10)
    assert missing_argument.body["code"] == 500
    assert missing_argument.body["description"].startswith("TypeError: ")
    stubborn = await deploy(
        sandbox, "stubborn.py", Inbox(f"{RUNTIME}/protostub/9"), classname="Stubborn", url=f"{RUNTIME}/protostub/9"
    )
    with pytest.raises(TimeoutError):
        await stubborn.execute("disconnect", [], timeout=0.2)


async def test_bad_deploy_arguments_name_the_problem(sandbox):
    with pytest.raises(DeployError, match="not UTF-8"):
        await deploy(sandbox, "", Inbox(), code=b"\xff\xfe")
    with pytest.raises(DeployError, match="config is not JSON-serialisable"):
        await deploy(sandbox, "echo.py", Inbox(), config={"x": object()})
    with pytest.raises(ValueError, match="url must be a non-empty string"):
        await deploy(sandbox, "echo.py", Inbox(), url="")
    small = ProcessSandbox(max_frame=1000, prestart=0)
    with pytest.raises(DeployError, match="does not fit the 1000-byte frame limit"):
        await deploy(small, "", Inbox(), code=b"#" * 2000)
    await small.close()


@needs_bwrap
@pytest.mark.parametrize("sandbox", [True], indirect=True)
async def test_under_bwrap_the_stub_cannot_write_outside_its_tmp(sandbox, tmp_path):
    secret = make_secret(tmp_path)
    package = PACKAGE
    targets = ["/tmp/allowed.txt", str(tmp_path / "escape.txt"), str(package / "evil.py"), "/usr/evil", "/etc/evil"]
    inbox = Inbox()
    component = await deploy(sandbox, "fs_probe.py", inbox, classname="FsProbe")
    component.post(request(1, {"write": targets, "read": [str(secret), "/etc/shadow"]}))
    result = (await inbox.data()).body
    assert result["write"]["/tmp/allowed.txt"] == "ok"
    for target in targets[1:]:
        assert result["write"][target].startswith("denied"), target
        assert not exists(target)
    assert all(outcome.startswith("denied") for outcome in result["read"].values())
    status = result["status"]
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    assert "CapEff:\t0000000000000000" in status
    assert "written by a stub" not in read_or_empty("/tmp/allowed.txt")


@pytest.mark.parametrize("sandbox", [False], indirect=True)
async def test_without_bwrap_landlock_keeps_writes_in_the_private_workdir(sandbox, tmp_path):
    secret = make_secret(tmp_path)
    package = PACKAGE
    inbox = Inbox()
    component = await deploy(sandbox, "fs_probe.py", inbox, classname="FsProbe")
    workdir = component.isolation["workdir"]
    targets = [f"{workdir}/allowed.txt", str(tmp_path / "escape.txt"), str(package / "evil.py")]
    component.post(request(1, {"write": targets, "read": [str(secret)]}))
    result = (await inbox.data()).body
    assert result["write"][targets[0]] == "ok"
    for target in targets[1:]:
        assert result["write"][target] == "denied: PermissionError errno 13", target
        assert not exists(target)
    assert result["read"][str(secret)] == "denied: PermissionError errno 13"
    assert "CapEff:\t0000000000000000" in result["status"]
    await component.remove()
    await sandbox.close()
    assert not exists(workdir)


async def test_a_missing_layer_is_a_logged_warning(caplog):
    caplog.set_level(logging.WARNING, logger="protofly")
    box = ProcessSandbox(use_bwrap=False, seccomp=False, prestart=0)
    try:
        component = await deploy(box, "echo.py", Inbox(), classname="EchoStub")
    finally:
        await box.close()
    assert "seccomp: disabled by configuration" in component.isolation["missing"]
    warnings = [r for r in caplog.records if r.getMessage() == "stub deployed with isolation layers missing"]
    assert warnings and "seccomp: disabled by configuration" in warnings[0].missing


async def test_a_prestarted_host_is_used_for_the_next_deploy():
    box = ProcessSandbox(prestart=1)
    try:
        await box.start()
        await box.wait_ready()
        [spare] = box.hosts
        inbox = Inbox()
        component = await deploy(box, "echo.py", inbox, classname="EchoStub")
        assert component.pid == spare.pid
        await inbox.status("created")
        await box.wait_ready()  # a replacement was started
        assert len(box.hosts) == 2 and component in box.hosts
    finally:
        await box.close()


async def test_a_taken_spare_is_replaced_after_the_deploy_not_during_it():
    box = ProcessSandbox(prestart=1)
    try:
        await box.wait_ready()
        [spare] = box.hosts
        component = await deploy(box, "echo.py", Inbox(), classname="EchoStub")
        assert component.pid == spare.pid
        assert box.hosts == [component]  # no replacement starting beside the deploy: it starts a moment later
        await wait_until(lambda: len(box.hosts) == 2)
        await box.wait_ready()
        [replacement] = [host for host in box.hosts if host is not component]
        assert replacement.state == "ready" and replacement.pid != component.pid
    finally:
        await box.close()


async def test_a_spare_that_died_is_replaced_by_a_fresh_host():
    box = ProcessSandbox(prestart=1)
    try:
        await box.start()
        await box.wait_ready()
        [spare] = box.hosts
        os.kill(spare.pid, signal.SIGKILL)
        # A spare that died: reaped (until then its host may still be alive below the killed bwrap, take the
        # deploy and report its confinement, and a host that got that far is not retried).
        assert await spare.wait_exit(5.0)
        inbox = Inbox()
        component = await deploy(box, "echo.py", inbox, classname="EchoStub")
        assert component.pid != spare.pid
        await inbox.status("created")
        assert inbox.exits == []
    finally:
        await box.close()


async def test_a_message_to_a_stub_posted_after_exit_is_counted_not_sent(sandbox):
    inbox = Inbox()
    component = await deploy(sandbox, "echo.py", inbox, classname="EchoStub")
    await component.remove()
    component.post(Message(type="create", from_="hyperty://a.test/h", to="hyperty://b.test/x"))
    assert component.counters["dropped_to_stub"] == 1
