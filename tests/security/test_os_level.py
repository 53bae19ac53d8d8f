"""OS-level attacks through the full runtime path: secrets, files, signals, syscalls.

The same attempts as the sandbox's own tests (``tests/integration/sandbox``), made by a stub that a
catalogue served and the runtime deployed on demand.  Each is checked from the victim's side (the runtime
process, another stub's processes, the checkout, another domain's credentials); the runtime cannot see
a denied system call, so these are contained rather than counted, and the stub stays as it was: live,
never restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from tests.processes import alive, descendants
from tests.security.conftest import CHECKOUT, EVIL, HAS_BWRAP, VICTIM, assert_confined, order

SECRET_ENV = "PROTOFLY_HOSTILE_SUITE_SECRET"
SECRET_VALUE = "runtime-secret-4b1d"
CAROL_PASSWORD = "carol-secret-9e2f"


@pytest.fixture
def credentials(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({VICTIM: {"password": CAROL_PASSWORD}, EVIL: {"token": "evil's own"}}))
    return path


async def test_secrets_and_files_stay_out_of_reach(world, tmp_path, credentials, monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET_VALUE)
    secret = tmp_path / "runtime-secret.txt"
    secret.write_text(SECRET_VALUE)
    await world.publish(EVIL, "hostile_os.py", "HostileOs")
    outside = [CHECKOUT / "hostile-stub-was-here.txt", CHECKOUT / "src" / "protofly" / "hostile.py", tmp_path / "x"]
    async with world.runtime(credentials_file=credentials) as runtime:
        tester = await runtime.new_hyperty()

        report = await order(
            tester,
            EVIL,
            read=[str(credentials), str(secret), f"/proc/{os.getpid()}/environ", "/etc/shadow"],
            write=[*map(str, outside), "/tmp/own.txt"],
        )

        assert_confined(runtime.registry.stub(EVIL))
        assert report["credentials"] == {"token": "evil's own"}  # its own domain's, nobody else's
        assert SECRET_ENV not in report["env"]
        assert SECRET_VALUE not in json.dumps(report) and CAROL_PASSWORD not in json.dumps(report)
        assert all(outcome.startswith("denied") for outcome in report["read"].values()), report["read"]
        assert report["write"].pop("/tmp/own.txt") == "ok"  # its private /tmp
        assert not any(path.exists() for path in outside)  # nothing reached the host's file system
        # A checkout under /tmp is shadowed by the stub's private /tmp, where a write may "succeed" unseen.
        reachable = {path: outcome for path, outcome in report["write"].items() if not path.startswith("/tmp/")}
        assert all(outcome.startswith("denied") for outcome in reachable.values()), report["write"]
        evil = runtime.registry.stub(EVIL)
        assert evil.status == "live" and evil.restarts == 0


@pytest.mark.skipif(not HAS_BWRAP, reason="signals to the runtime are kept out by bwrap's PID namespace")
async def test_signals_and_syscalls_do_not_reach_the_runtime_or_another_stub(world) -> None:
    await world.publish(VICTIM, "holder.py", "Holder")
    await world.publish(EVIL, "hostile_os.py", "HostileOs")
    loop = asyncio.get_running_loop()
    signalled: list[str] = []
    # A harmless signal for the runtime's own process: containment failing shows here, not as a dead test run.
    loop.add_signal_handler(signal.SIGUSR2, signalled.append, "SIGUSR2")
    try:
        async with world.runtime() as runtime:
            tester = await runtime.new_hyperty()
            victim = (await runtime.load_stub(VICTIM)).record
            victim_pids = sorted({victim.info["pid"], *descendants(victim.info["pid"])})
            orders = [[os.getpid(), signal.SIGUSR2], *([pid, signal.SIGKILL] for pid in victim_pids)]

            report = await order(tester, EVIL, signal=orders, ptrace_pid=victim_pids[-1])

            assert_confined(runtime.registry.stub(EVIL))
            assert all(outcome.startswith("denied") for outcome in report["signal"].values()), report["signal"]
            assert signalled == []
            assert all(alive(pid) for pid in victim_pids)
            assert all(outcome.startswith("denied") for outcome in report["syscalls"].values()), report["syscalls"]
            assert report["bind"].startswith("denied")
            log = await tester.request(f"hyperty://{VICTIM}/log", timeout=20)  # the victim still answers
            assert log.body["code"] == 200
            assert victim.status == "live" and victim.restarts == 0
            evil = runtime.registry.stub(EVIL)
            assert evil.status == "live" and evil.restarts == 0
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)
