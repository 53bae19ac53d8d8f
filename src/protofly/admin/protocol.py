"""What the admin server and its clients agree on: where the socket is, the error shape, the time limits.

Kept free of aiohttp, rich and the runtime (standard library only) because both sides import it, and the
client commands import it before they know whether they will talk to anything: ``protofly --help`` and a
command that fails on a missing ``--state-dir`` must not pay for the HTTP stack.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CLI_COMPONENT",
    "DEPLOY_GRACE",
    "ENV_ADMIN",
    "MAX_EVENT_LINE",
    "MAX_SEND_TIMEOUT",
    "MAX_SOCKET_PATH",
    "SOCKET_NAME",
    "AdminError",
    "AdminUnavailableError",
    "admin_socket",
]

#: The socket's file name inside the runtime's state directory.
SOCKET_NAME = "admin.sock"
#: Environment variable naming the admin socket (for ``runtime serve`` and for the client commands).
ENV_ADMIN = "PROTOFLY_ADMIN"
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Longest ``/send`` timeout a caller may ask for, in seconds.
MAX_SEND_TIMEOUT = 300.0
#: Seconds either side waits beyond the runtime's own limit before it calls an operation timed out itself:
#: the runtime's answer (a 504 with its reason) should win over a bare transport timeout.
DEPLOY_GRACE = 10.0
#: The local address ``/send`` uses as ``from`` when the message has none: ``<runtimeURL>/cli``.
CLI_COMPONENT = "cli"
#: Longest NDJSON line the client accepts (a deploy result with a long history is a few KiB).
MAX_EVENT_LINE = 4 << 20


class AdminError(Exception):
    """An admin request that failed: ``status`` is the HTTP status, ``field`` the input at fault (if any)."""

    def __init__(self, text: str, status: int = 400, field: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.field = field

    def as_json(self) -> dict[str, Any]:
        """The body every failed request answers with: ``{"error", "code", "field"?}``."""
        body: dict[str, Any] = {"error": self.text, "code": self.status}
        if self.field is not None:
            body["field"] = self.field
        return body


class AdminUnavailableError(AdminError):
    """Nothing answers on the admin socket: no runtime is running there (or it is not ours to reach)."""


def admin_socket(
    *,
    admin: Path | str | None = None,
    state_dir: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """Where the admin socket is: ``admin``, else ``$PROTOFLY_ADMIN``, else ``<state_dir>/admin.sock``.

    The server and the clients use this one rule, so a client started in the runtime's environment finds
    the runtime's socket.  None when nothing says where.
    """
    env = os.environ if environ is None else environ
    if admin:
        return Path(admin).expanduser()
    if env.get(ENV_ADMIN):
        return Path(env[ENV_ADMIN]).expanduser()
    if state_dir:
        return Path(state_dir).expanduser() / SOCKET_NAME
    return None
