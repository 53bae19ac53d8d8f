"""Throw-away third-party back-ends for the interworking stubs: Prosody (XMPP) and Mosquitto (MQTT).

The demo, the integration tests and ``bench/protocols.py`` start real servers that nobody here wrote, each
with its own configuration, data directory and log under a directory the caller owns, listening on
127.0.0.1 on a port chosen at run time, in the foreground, and stop them by their own pid (never by name).
A server can be stopped and started again on the same port and data (the restart tests); what it persisted
(Prosody's offline messages, Mosquitto's persistent sessions and retained messages) survives.

The log is kept so that tests can count what the server saw (connection attempts, refused logins) instead
of trusting the client's word for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

__all__ = ["INSTALL_HINT", "BackendError", "Mosquitto", "Prosody", "free_port", "missing_servers"]

#: How to get the servers on Debian, for messages that say what is missing.
INSTALL_HINT = "apt-get install prosody mosquitto (or run scripts/system-deps.sh as root)"


class BackendError(RuntimeError):
    """A back-end server could not be started; the text says which and why (with its log's tail)."""


def missing_servers() -> list[str]:
    """The Debian packages whose server binaries are not installed (empty when both are)."""
    missing = []
    if shutil.which("prosody") is None or shutil.which("prosodyctl") is None:
        missing.append("prosody")
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        missing.append("mosquitto")
    return missing


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _wait_port(port: int, process: asyncio.subprocess.Process, log: Path, timeout: float) -> None:
    """Return once ``port`` accepts connections; raise :class:`BackendError` if the process exits or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if process.returncode is not None:
            raise BackendError(f"server exited with status {process.returncode}: {_tail(log)}")
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise BackendError(
                    f"server did not listen on 127.0.0.1:{port} within {timeout} s: {_tail(log)}"
                ) from None
            await asyncio.sleep(0.02)  # nothing signals "listening"; poll the port, bounded by the deadline
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Server:
    """One server process: started in the foreground, stopped by its pid (TERM, then KILL)."""

    name = "server"

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.log = root / f"{self.name}.log"
        self.process: asyncio.subprocess.Process | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    @property
    def endpoint(self) -> str:
        """The egress URL a stub declares for this server."""
        return f"tcp://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None

    async def start(self, timeout: float = 10.0) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                env=self.environment(),
                start_new_session=True,
            )
        try:
            await _wait_port(self.port, self.process, self.log, timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, *, kill: bool = False, timeout: float = 5.0) -> None:
        """Stop the process by its pid: SIGTERM (SIGKILL with ``kill``, or when TERM is not enough)."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Prosody(_Server):
    """Prosody serving ``domain`` on 127.0.0.1: plain c2s (no TLS on a throw-away loopback server), SCRAM logins."""

    name = "prosody"

    def __init__(self, root: Path, domain: str = "chat.test", port: int | None = None) -> None:
        super().__init__(root, port)
        self.domain = domain
        self.config = root / "prosody.cfg.lua"
        self.data = root / "data"
        self.data.mkdir(exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    'pidfile = "' + str(root / "prosody.pid") + '"',
                    'data_path = "' + str(self.data) + '"',
                    "run_as_root = true",
                    'log = { debug = "' + str(self.log) + '" }',
                    "c2s_ports = { " + str(self.port) + " }",
                    'c2s_interfaces = { "127.0.0.1" }',
                    "s2s_ports = { }",
                    "c2s_direct_tls_ports = { }",
                    "legacy_ssl_ports = { }",
                    "http_ports = { }",
                    "https_ports = { }",
                    # small stanzas answered by small stanzas: Nagle plus the peer's delayed ACK would add 40 ms
                    "network_settings = { nagle = false }",
                    "c2s_require_encryption = false",
                    "allow_unencrypted_plain_auth = true",
                    'authentication = "internal_hashed"',
                    'storage = "internal"',
                    'limits = { c2s = { rate = "100mb/s" } }',
                    "modules_enabled = { 'roster', 'saslauth', 'disco', 'ping', 'presence', 'offline', 'posix' }",
                    "modules_disabled = { 's2s', 'tls' }",
                    "daemonize = false",
                    'VirtualHost "' + domain + '"',
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return ["prosody", "--config", str(self.config), "-F"]

    async def register(self, user: str, password: str) -> None:
        """Create (or reset) an account with ``prosodyctl register`` on the same config and data."""
        process = await asyncio.create_subprocess_exec(
            "prosodyctl",
            "--config",
            str(self.config),
            "register",
            user,
            self.domain,
            password,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        if process.returncode != 0:
            raise BackendError(f"prosodyctl register {user}@{self.domain} failed: {out.decode(errors='replace')}")

    def login_attempts(self) -> int:
        """How many c2s connections the server accepted (one per client connection attempt)."""
        return self.log_text().count("Client connected")


class Mosquitto(_Server):
    """Mosquitto on 127.0.0.1 with a password file (no anonymous clients) and persistence (sessions survive)."""

    name = "mosquitto"

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(root, port)
        self.config = root / "mosquitto.conf"
        self.passwords = root / "passwords"
        self.passwords.touch()
        self.config.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "user root",
                    "set_tcp_nodelay true",
                    "allow_anonymous false",
                    f"password_file {self.passwords}",
                    "persistence true",
                    f"persistence_location {root}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                    "log_dest stderr",
                    "log_type all",
                    "connection_messages true",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config)]

    async def add_user(self, user: str, password: str) -> None:
        """Add ``user`` to the password file (takes effect at the next start, or on SIGHUP)."""
        process = await asyncio.create_subprocess_exec(
            "mosquitto_passwd",
            "-b",
            str(self.passwords),
            user,
            password,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        if process.returncode != 0:
            raise BackendError(f"mosquitto_passwd {user} failed: {out.decode(errors='replace')}")
        if self.pid is not None:
            os.kill(self.pid, signal.SIGHUP)

    def login_attempts(self) -> int:
        """How many logins the broker answered (a CONNACK, accepting or refusing, per client connection attempt)."""
        return self.log_text().count("Sending CONNACK to")
