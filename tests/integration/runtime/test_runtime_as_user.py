"""The runtime run by an unprivileged user: its stubs deploy, are unprivileged (inside: the sandbox uid; on
the host: that user, never root), and a layer the user cannot have (cgroups not delegated) is reported."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.runtime.as_user import as_user, create_user, readable_environment
from tests.integration.runtime.containment import proc_status, publish_stub

from protofly.sandbox import cgroup
from protofly.sandbox.isolation import SANDBOX_UID


@pytest.fixture(scope="session")
def unprivileged_user() -> Iterator[pwd.struct_passwd]:
    yield from create_user()


@pytest.fixture(scope="session")
def user_environment(unprivileged_user: pwd.struct_passwd) -> Iterator[Path]:
    yield from readable_environment(unprivileged_user)


@contextlib.asynccontextmanager
async def user_runtime(
    user: pwd.struct_passwd, environment: Path, settings: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """Run tests/integration/runtime/as_user_runtime.py as ``user``; yield its report, then let it close."""
    command = [*as_user(user), str(environment / "venv" / "bin" / "python"), str(environment / "as_user_runtime.py")]
    process = await asyncio.create_subprocess_exec(
        *command,
        json.dumps(settings),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=environment,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(environment)},
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if not line:
            error = await asyncio.wait_for(process.stderr.read(), 10)
            raise AssertionError(f"the runtime run as {user.pw_name} failed: {error.decode()[-3000:]}")
        yield json.loads(line)
    finally:
        if process.returncode is None:
            process.stdin.write(b"done\n")
            await process.stdin.drain()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def shared_copy(path: Path, directory: Path) -> str:
    """``path`` copied where the user can read it (pytest's tmp_path is root's, 0700)."""
    target = directory / path.name
    shutil.copy2(path, target)
    target.chmod(0o644)
    return str(target)


@contextlib.contextmanager
def delegated_cgroups(user: pwd.struct_passwd) -> Iterator[str]:
    """A cgroup v1 parent (memory, pids, cpuacct) owned by ``user``, as an administrator delegates one."""
    mounts = cgroup.hierarchies()
    if not {"memory", "pids"} <= set(mounts) or os.path.exists("/sys/fs/cgroup/cgroup.subtree_control"):
        pytest.skip("no cgroup v1 memory and pids hierarchies to delegate here")
    name = f"/protofly-delegated-{os.getpid()}"
    remove_stale_delegations(mounts)
    made: list[Path] = []
    try:
        for controller in ("memory", "pids", "cpuacct"):
            if controller not in mounts:
                continue
            delegated = mounts[controller] / name.lstrip("/")
            delegated.mkdir()
            made.append(delegated)
            for item in [delegated, *delegated.iterdir()]:
                os.chown(item, user.pw_uid, user.pw_gid)
        yield name
    finally:
        for directory in made:
            remove_tree(directory)


def remove_stale_delegations(mounts: dict[str, Path]) -> None:
    """Remove what a test run that was killed before its teardown left: ``protofly-delegated-<pid>`` of a
    pid that is gone (its runtimes are gone too, so the groups are empty)."""
    for controller in ("memory", "pids", "cpuacct"):
        mount = mounts.get(controller)
        for directory in mount.glob("protofly-delegated-*") if mount is not None else []:
            pid = directory.name.removeprefix("protofly-delegated-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    remove_tree(directory, timeout=1.0)


def remove_tree(directory: Path, timeout: float = 10.0) -> None:
    """Remove a cgroup directory and the groups below it, deepest first, once their processes are gone
    (the user's runtime has ended, but the kernel may still be tearing its last processes down)."""
    deadline = time.monotonic() + timeout
    below = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for group in [*below, directory]:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a synchronous fixture teardown: nothing to await


@pytest.mark.parametrize("delegated", [False, True], ids=["no-cgroups", "delegated-cgroups"])
async def test_a_runtime_run_as_a_normal_user_deploys_unprivileged_stubs(
    domains, unprivileged_user, user_environment, delegated
) -> None:
    user = unprivileged_user
    publish_stub(domains, "b.test", "ns_probe.py", "NsProbe")
    await domains.serve("b.test")
    settings: dict[str, Any] = {
        "domain": "a.test",
        "catalogues": domains.resolver(),
        "trust_store": shared_copy(domains.trust_file(), user_environment),
        "allow_http_loopback": True,
        "resolver_only": True,
        "deploy_timeout": 20.0,
        "sandbox_preload": [],
    }
    with contextlib.ExitStack() as stack:
        if delegated:
            settings["cgroup_parent"] = stack.enter_context(delegated_cgroups(user))
        async with user_runtime(user, user_environment, settings) as report:
            assert report["uid"] == user.pw_uid
            assert report["answer"]["code"] == 200, report
            seen = report["answer"]["value"]
            assert seen["uid"] == [SANDBOX_UID] * 3  # inside: nobody, in the stub's own user namespace
            assert seen["clone_newuser"] == "errno 1"
            isolation = report["isolation"]
            assert isolation["user"] == {"host_uid": user.pw_uid, "uid": SANDBOX_UID}
            assert "user" in isolation["bwrap"]["namespaces"]
            hosts = [pid for pid in report["pids"] if proc_status(pid).get("Name") != "bwrap"]
            assert hosts
            for pid in report["pids"]:  # on the host: every process of the stub's tree is the user, none root
                assert proc_status(pid)["Uid"].split() == [str(user.pw_uid)] * 4
            if delegated:
                assert isolation["cgroup"]["path"].startswith(settings["cgroup_parent"] + "/")
                assert report["usage"]["processes"] >= 1
            else:
                assert isolation["cgroup"] is False  # the user was given no cgroup: reported, not silent
                assert [m for m in isolation["missing"] if m.startswith("cgroup: ")]
