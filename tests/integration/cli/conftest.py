"""Fixtures for the operator CLI: signed echo stubs behind real catalogue servers, and the real executable.

``b.test`` publishes ``stubs/echo`` signed with a key pinned in the trust store; ``c.test`` publishes the
same stub signed with a key the trust store does not know, so deploying it fails verification.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer

ROOT = Path(__file__).resolve().parents[3]
ECHO = ROOT / "stubs" / "echo"
PROTOFLY = str(Path(sys.executable).parent / "protofly")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any PROTOFLY_* setting (hermetic), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOFLY_")}
    env.update(extra)
    return env


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run ``protofly ARGS`` to completion (bounded); return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        PROTOFLY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env or clean_env()
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


@dataclass
class World:
    """Catalogue servers in the test process and the trust store a runtime uses."""

    root: Path
    servers: dict[str, CatalogueServer] = field(default_factory=dict)
    trust_file: Path | None = None

    def catalogue_flags(self) -> list[str]:
        flags: list[str] = []
        for domain, server in self.servers.items():
            flags += ["--catalogue", f"{domain}={server.base_url}"]
        return flags


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    root = tmp_path / "world"
    trusted, stranger = SigningKey.generate("b.test"), SigningKey.generate("c.test")
    trust = TrustStore()
    trust.add("b.test", trusted.public_raw)
    world = World(root, trust_file=root / "trust.json")
    root.mkdir()
    trust.save(world.trust_file)
    try:
        for domain, key in (("b.test", trusted), ("c.test", stranger)):
            publish(ECHO, root / domain, key, domain)
            server = CatalogueServer(root / domain, default="echo")
            await server.start()
            world.servers[domain] = server
        yield world
    finally:
        for server in world.servers.values():
            await server.stop()


class RuntimeProcess:
    """A ``protofly runtime serve`` subprocess, stopped by its own pid."""

    def __init__(self, proc: asyncio.subprocess.Process, socket: Path, stderr: Path, line: str) -> None:
        self.proc = proc
        self.socket = socket
        self.stderr = stderr
        self.line = line

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            raise

    def log_lines(self) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if line.strip()]


async def start_runtime(
    world: World, state_dir: Path, *options: str, root_options: tuple[str, ...] = (), timeout: float = 20
) -> RuntimeProcess:
    """Start ``protofly [root options] runtime serve`` for a.test and wait (bounded) for its listening line."""
    stderr = state_dir.parent / f"{state_dir.name}-runtime.log"
    args = [
        *root_options,
        "runtime",
        "serve",
        "--domain",
        "a.test",
        "--state-dir",
        str(state_dir),
        "--trust-store",
        str(world.trust_file),
        "--allow-http-loopback",
        "--resolver-only",
        *world.catalogue_flags(),
        *options,
    ]
    with stderr.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            PROTOFLY,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=sink,
            env=clean_env(PROTOFLY_DEPLOY_TIMEOUT="10", PROTOFLY_SANDBOX="process"),
        )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if "listening on" not in line:
        await asyncio.wait_for(proc.wait(), timeout)
        raise AssertionError(f"runtime did not start (exit {proc.returncode}): {line}{stderr.read_text()}")
    return RuntimeProcess(proc, state_dir / "admin.sock", stderr, line)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
