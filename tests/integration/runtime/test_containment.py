"""Containment per stub, through the full runtime path: signed hostile stubs served by a real catalogue,
deployed into the process sandbox; the kernel's cgroup counters, seccomp and the sandbox user stop them."""

from __future__ import annotations

import errno
import os
import re

import pytest
from tests.integration.runtime.containment import (
    Watch,
    fire,
    needs_cgroups,
    proc_status,
    publish_stub,
    question,
    start_time,
    zombie,
)
from tests.polling import wait_until

from protofly.message import response_code
from protofly.sandbox import cgroup

MIB = 1 << 20


@needs_cgroups
async def test_a_2000_process_fork_bomb_is_capped_at_the_pids_limit_and_recorded(domains, runtime_factory) -> None:
    publish_stub(domains, "b.test", "fork_bomb.py", "ForkBomb", {"processes": 32})
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", processes=64) as runtime:
        await runtime.load_stub("b.test")
        record = runtime.registry.stub("b.test")
        assert record.isolation["cgroup"]["pids_max"] == 32  # the descriptor's request, below the runtime's 64
        watch = Watch(runtime)
        bomb = await fire(runtime, question("b.test", {"forks": 2000}))
        crash = await watch.crash()
        bomb.cancel()
        found = re.fullmatch(
            r"process limit \(cgroup: pids.max 32 reached by (\d+) tasks, (\d+) forks refused\)", crash.reason
        )
        assert found is not None, crash.reason
        assert int(found[1]) <= 32  # the tree never grew past the limit
        assert int(found[2]) >= 1  # the kernel's own count of the forks it refused
        assert [e for e in record.history if e.value == "failed"][-1].description == crash.reason
        await watch.lives_again(1)  # restarted under the usual backoff
        assert record.counters["process_limit"] == 1  # counted, and the count outlives the restart
        assert runtime.usage("b.test")["processes"] <= 32


@needs_cgroups
@pytest.mark.parametrize("how", ["children", "memfd", "tmp"])
async def test_memory_through_children_memfd_and_tmp_is_capped_at_the_descriptor_limit(
    domains, runtime_factory, how
) -> None:
    publish_stub(domains, "b.test", "memory_eater.py", "MemoryEater", {"memoryMB": 128})
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", memory_mb=512, tmp_mb=2048) as runtime:
        await runtime.load_stub("b.test")
        record = runtime.registry.stub("b.test")
        assert record.isolation["cgroup"]["memory_max_mb"] == 128
        watch = Watch(runtime)
        eater = await fire(runtime, question("b.test", {"how": how}))
        crash = await watch.crash()
        eater.cancel()
        assert crash.reason.startswith("memory limit (cgroup: "), crash.reason
        assert crash.reason.endswith("at 128 MiB)")
        await watch.lives_again(1)
        assert record.counters["memory_limit"] == 1
        assert runtime.usage("b.test")["memory_peak_bytes"] <= 128 * MIB


async def test_the_private_tmp_has_a_size_limit(domains, runtime_factory) -> None:
    publish_stub(domains, "b.test", "memory_eater.py", "MemoryEater")
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", memory_mb=512, tmp_mb=16) as runtime:
        answer = await runtime.bus.request(question("b.test", {"how": "tmp"}), timeout=30)
        assert response_code(answer) == 200, answer.body
        result = answer.body["value"]
        assert result["errno"] == errno.ENOSPC
        assert result["written_mib"] <= 16
        assert "private tmpfs /tmp of 16 MiB" in runtime.registry.stub("b.test").isolation["bwrap"]["filesystem"]


@needs_cgroups
async def test_unload_stub_leaves_no_process_of_the_stub_s_tree(domains, runtime_factory) -> None:
    publish_stub(domains, "b.test", "fork_bomb.py", "ForkBomb")
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process") as runtime:
        answer = await runtime.bus.request(question("b.test", {"forks": 10}), timeout=30)
        assert answer.body["value"]["forked"] == 10
        report = runtime.registry.stub("b.test").isolation["cgroup"]
        pids = cgroup.members(report)
        assert pids is not None and len(pids) >= 11  # the host and its ten children (and bwrap's helpers)
        started = {pid: start_time(pid) for pid in pids}
        usage = runtime.usage("b.test")
        assert usage["processes"] >= 11
        await runtime.unload_stub("b.test")

        # Every one was SIGKILLed and has left the group; the kernel may still be tearing one down (it leaves
        # its cgroup before it becomes a zombie), so wait, bounded, for each to be gone or a zombie (a
        # process that ended and waits to be reaped by its new parent: it runs no more code).
        def survivors() -> list[int]:
            return [pid for pid, when in started.items() if start_time(pid) == when and not zombie(pid)]

        await wait_until(lambda: not survivors(), timeout=5)
        assert cgroup.members(report) is None  # and the group itself is removed


async def test_namespace_creating_clone_fails_and_the_stub_is_an_unprivileged_user(domains, runtime_factory) -> None:
    publish_stub(domains, "b.test", "ns_probe.py", "NsProbe")
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process") as runtime:
        answer = await runtime.bus.request(question("b.test"), timeout=30)
        assert response_code(answer) == 200, answer.body
        seen = answer.body["value"]
        eperm, enosys = f"errno {errno.EPERM}", f"errno {errno.ENOSYS}"
        assert seen["clone_newuser"] == eperm
        assert seen["clone_newns_newnet"] == eperm
        assert seen["clone_newpid"] == eperm
        assert seen["clone3_newuser"] == enosys
        assert seen["clone3_plain"] == enosys  # libc falls back to clone, whose flags the filter reads:
        assert seen["fork"] == "exit 7"  # an ordinary fork still works
        assert seen["thread"] == "ran"  # and so does a thread
        assert seen["unshare_newuser"] == eperm
        assert 0 not in seen["uid"] and 0 not in seen["gid"] and seen["groups"] in ([], [seen["gid"][0]])
        isolation = runtime.registry.stub("b.test").isolation
        assert "no namespace-creating clone, no clone3" in isolation["seccomp"]
        host_uid = isolation["user"]["host_uid"]
        assert (host_uid != 0 and host_uid != os.geteuid()) or os.geteuid() != 0
        # On the host: the stub's own processes (not bwrap's helpers) run as the unprivileged sandbox user.
        if isolation["cgroup"]:
            pids = cgroup.members(isolation["cgroup"]) or []
        else:
            pids = [runtime.registry.stub("b.test").info["pid"]]
        hosts = [pid for pid in pids if proc_status(pid).get("Name") != "bwrap"]
        assert hosts, pids
        for pid in hosts:
            assert proc_status(pid)["Uid"].split() == [str(host_uid)] * 4
            assert proc_status(pid)["CapEff"] == "0000000000000000"
