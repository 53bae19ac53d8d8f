"""The process sandbox's cgroup per host: what leaves the host's process tree is still the stub's."""

from __future__ import annotations

import pytest
from tests.integration.runtime.containment import needs_cgroups, start_time, zombie
from tests.integration.sandbox.sandbox_helpers import Inbox, deploy, request, tree
from tests.polling import wait_until

from protofly.sandbox import cgroup
from protofly.sandbox.process import ProcessSandbox


@needs_cgroups
@pytest.mark.parametrize("sandbox", [False], indirect=True)
async def test_removal_kills_a_daemon_the_stub_left_outside_its_process_tree(sandbox: ProcessSandbox) -> None:
    # Without bwrap there is no pid namespace to take the daemon with it: only the cgroup still holds it.
    inbox = Inbox()
    component = await deploy(sandbox, "escaper.py", inbox, classname="Escaper")
    component.post(request(1))
    daemon = (await inbox.data()).body["value"]["daemon"]
    report = component.isolation["cgroup"]
    assert daemon in (cgroup.members(report) or [])
    started = start_time(daemon)
    assert started is not None
    await component.remove()
    assert start_time(daemon) != started or zombie(daemon)
    assert cgroup.members(report) is None


@needs_cgroups
async def test_a_spare_host_is_in_its_own_cgroup_before_any_stub_code_runs() -> None:
    box = ProcessSandbox(prestart=2)
    try:
        await box.wait_ready()
        hosts = box.hosts
        assert len(hosts) == 2
        groups = []
        for host in hosts:
            assert host.state == "ready" and host.pid is not None and host.cgroup is not None
            members = set(host.cgroup.pids())
            assert set(tree(host.pid)) <= members  # bwrap, its pid 1 and the host: all placed
            usage = host.cgroup.usage()
            assert usage.memory_bytes is not None and usage.memory_bytes > 4 << 20  # the host's imports
            groups.append(host.cgroup.report())
        assert len({group["path"] for group in groups}) == 2  # one group per host
    finally:
        await box.close()
    assert [cgroup.members(group) for group in groups] == [None, None]  # closing removes them


@needs_cgroups
async def test_closing_while_a_spare_is_still_starting_removes_its_cgroup_and_the_runtime_s() -> None:
    box = ProcessSandbox(prestart=1)
    await box.start()  # the spare starts in the background: close before it is ready
    await wait_until(lambda: any(host.pid is not None for host in box.hosts))  # spawned, not yet ready
    [starting] = box.hosts
    assert starting.state == "starting" and starting.cgroup is not None
    report = starting.cgroup.report()
    assert box.cgroup_tree is not None
    runtime_groups = list(box.cgroup_tree.dirs.values())
    await box.close()
    assert cgroup.members(report) is None  # the spare's group is gone
    assert [group for group in runtime_groups if group.is_dir()] == []  # and so is the runtime's
