"""The state directory and the admin socket belong to the runtime's user, or nothing starts or connects.

The ownership cases need root (``chown`` to another uid, running the client as ``nobody``); CI runs as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from protofly.admin.client import AdminClient
from protofly.admin.protocol import AdminError
from protofly.admin.server import AdminServer
from protofly.config import RuntimeConfig
from protofly.registry import RegistryError
from protofly.runtime import Runtime

OTHER_UID = 54321
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid / run as nobody")


def config(state: Path) -> RuntimeConfig:
    return RuntimeConfig(domain="a.test", state_dir=state, sandbox="in-process", resolver_only=True)


async def test_a_state_directory_others_may_write_to_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o777)
    with pytest.raises(RegistryError, match=r"writable by others \(mode 777\).*chmod go-w"):
        async with Runtime(config(state)):
            pass
    assert not (state / "runtime.sqlite").exists()  # refused before anything was written there
    state.chmod(0o775)  # group-writable is refused as well
    with pytest.raises(RegistryError, match="writable by others"):
        async with Runtime(config(state)):
            pass


async def test_a_missing_state_directory_is_created_private(tmp_path):
    state = tmp_path / "new" / "state"
    async with Runtime(config(state)):
        pass
    assert state.stat().st_mode & 0o777 == 0o700 and (state / "runtime.sqlite").exists()


@as_root
async def test_a_state_directory_owned_by_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER_UID, OTHER_UID)
    with pytest.raises(RegistryError, match=f"owned by uid {OTHER_UID}, not by this process's user"):
        async with Runtime(config(state)):
            pass
    assert not (state / "runtime.sqlite").exists()


@as_root
async def test_the_admin_server_refuses_a_socket_directory_it_does_not_control(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may have put an admin.sock there first
    with pytest.raises(AdminError, match="admin socket directory .* writable by others"):
        await AdminServer(shared / "admin.sock").claim()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(AdminError, match=f"owned by uid {OTHER_UID}"):
        await AdminServer(theirs / "admin.sock").claim()
    assert not (shared / "admin.sock").exists() and not (theirs / "admin.sock").exists()


async def fake_runtime(path: Path, seen: list[str]) -> AsyncIterator[web.AppRunner]:
    """A unix-socket server that answers like a runtime and records every request it gets."""

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"runtime_url": "hyperty-runtime://evil.test/fake", "stubs": 0})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


@as_root
async def test_the_client_does_not_talk_to_a_socket_another_user_put_there(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    sock = state / "admin.sock"
    seen: list[str] = []
    runner = await fake_runtime(sock, seen)
    try:
        async with AdminClient(sock) as client:
            assert (await client.runtime())["runtime_url"] == "hyperty-runtime://evil.test/fake"  # ours: trusted
            os.chown(sock, OTHER_UID, OTHER_UID)  # the socket replaced by another user
            with pytest.raises(AdminError, match=f"permission denied on {sock}: the socket belongs to uid {OTHER_UID}"):
                await client.runtime()
            os.chown(sock, 0, 0)
            state.chmod(0o777)  # or its directory opened to everybody
            with pytest.raises(AdminError, match=f"permission denied on {sock}: its directory"):
                await client.stubs()
    finally:
        await runner.cleanup()
    assert seen == ["/runtime"]  # the fake runtime never got the refused requests


def _dirs_for_nobody() -> tuple[Path, Path]:
    """A base directory anyone may enter, holding nobody's private ``home`` and root's private ``root``."""
    base = Path(tempfile.mkdtemp(prefix="protofly-perm-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    (base / "root").mkdir(mode=0o700)
    return base, home


@as_root
async def test_a_user_refused_by_the_socket_permissions_is_told_so(tmp_path):
    # A directory nobody may enter; in it, nobody's own socket made unusable (mode 0): what the
    # kernel refuses must read "permission denied on <path>", not "no runtime is listening".
    base, home = _dirs_for_nobody()
    try:
        sock = home / "admin.sock"
        seen: list[str] = []
        runner = await fake_runtime(sock, seen)
        try:
            os.chown(sock, NOBODY, NOBODY)
            sock.chmod(0)
            code = (  # imports first (the interpreter may live where nobody cannot read), then become nobody
                "import asyncio, os, sys\n"
                "from protofly.admin.client import AdminClient\n"
                "from protofly.admin.protocol import AdminError\n"
                "import protofly.state, aiohttp.connector, asyncio.unix_events, concurrent.futures.thread\n"
                f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
                "async def main():\n"
                "    async with AdminClient(sys.argv[1]) as client:\n"
                "        await client.runtime()\n"
                "try:\n"
                "    asyncio.run(main())\n"
                "except AdminError as exc:\n"
                "    print(type(exc).__name__, exc.status, exc.text)\n"
            )
            results = {}
            for label, target in (("socket mode 0", sock), ("root's directory", base / "root" / "admin.sock")):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, str(target),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    cwd="/",
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                results[label] = out.decode().strip() or err.decode()
        finally:
            await runner.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert results["socket mode 0"].startswith(f"AdminError 403 permission denied on {sock}: Permission denied")
    assert results["root's directory"].startswith(
        f"AdminError 403 permission denied on {base / 'root' / 'admin.sock'}: Permission denied"
    ), results
    assert seen == []
    assert "no protofly runtime is listening" not in json.dumps(results)
