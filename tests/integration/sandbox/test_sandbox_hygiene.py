"""No process is ever left behind: a runtime that is SIGKILLed or shut down takes its stubs with it.

Each test runs a small runtime (sandbox_runtime.py) as its own process, learns the pids of every process
its sandbox started, stops the runtime, and checks by pid that none of them is left.  One of the stubs
spins in an endless loop, so it cannot notice its closed channel: only the kernel's parent-death signal
(PR_SET_PDEATHSIG, bwrap --die-with-parent) ends it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest
from tests.integration.sandbox.sandbox_helpers import MODES, all_ended, running_or_ours

from protofly.sandbox import cgroup
from protofly.sandbox.process import ProcessSandbox

SCRIPT = Path(__file__).resolve().parent / "sandbox_runtime.py"


async def start_runtime(mode: str) -> tuple[asyncio.subprocess.Process, list[int]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "2", mode, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        pids = json.loads(line)["pids"]
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process, pids


@pytest.mark.parametrize("use_bwrap", MODES)
async def test_a_sigkilled_runtime_leaves_no_stub_process(use_bwrap):
    process, pids = await start_runtime("bwrap" if use_bwrap else "plain")
    assert len(pids) >= 3  # two stubs and a spare, each with bwrap's helpers when bwrap is used
    assert all(running_or_ours(pid) for pid in pids)
    process.kill()
    await asyncio.wait_for(process.wait(), 10)
    await all_ended(pids)
    assert [pid for pid in pids if running_or_ours(pid)] == []
    # Its cgroups stay behind (empty: every process in them ended); the next runtime's sandbox removes them.
    left = [group for group in runtime_groups(process.pid) if group.is_dir()]
    box = ProcessSandbox(use_bwrap=use_bwrap, prestart=0)
    await box.start()
    await box.close()
    assert [group for group in left if group.is_dir()] == []


def runtime_groups(pid: int) -> list[Path]:
    """Where a runtime with ``pid`` started by this process made its group: ``protofly-<pid>`` beside this
    process's own cgroup, in each hierarchy (none where the machine offers no cgroups)."""
    mounts = cgroup.hierarchies()
    groups = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            if controller in mounts:
                groups.append(mounts[controller] / own.lstrip("/") / f"protofly-{pid}")
    return groups


@pytest.mark.parametrize("use_bwrap", MODES)
async def test_a_runtime_shut_down_by_cancellation_removes_its_stubs_first(use_bwrap):
    process, pids = await start_runtime("bwrap" if use_bwrap else "plain")
    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stdout.read(), 20)
    assert json.loads(rest) == {"closed": True}
    assert await asyncio.wait_for(process.wait(), 10) == 0
    # close() waited for every host to end before the runtime exited
    assert [pid for pid in pids if running_or_ours(pid)] == []
