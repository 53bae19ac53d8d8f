"""The runtime's admin API: JSON over HTTP on a unix socket, its client, and the commands built on both.

``protofly runtime serve`` holds one long-running :class:`~protofly.runtime.Runtime`; every other command
(``stub deploy``, ``stub list``, ``send``, ...) is a short-lived client of that process.

* :mod:`~protofly.admin.protocol`: what both sides agree on (socket location, error shape, time limits);
* :mod:`~protofly.admin.server`: the aiohttp application on the socket, and claiming the socket;
* :mod:`~protofly.admin.client`: :class:`AdminClient`;
* :mod:`~protofly.admin.views`: the JSON a stub is shown as, the NDJSON lines, tables and progress text;
* :mod:`~protofly.admin.commands`: the typer commands.

Endpoints (every error is ``{"error": <text>, "code": <HTTP status>, "field"?: <name>}``):

* ``GET /runtime``: runtime URL, domain, pid, configuration;
* ``GET /stubs``: every stub's :meth:`~protofly.registry.StubRecord.summary` plus ``history`` and ``pid``;
* ``POST /stubs/{domain-or-url}`` and ``POST /stubs/{domain}/retry``: NDJSON, one runtime event per line as
  the deployment goes (``step``, ``status``, ``live``, ...), then ``{"event": "result", "ok": ...}``;
* ``DELETE /stubs/{domain}``: unload;
* ``POST /send[?timeout=S]``: a reTHINK message in, its response message out.

The names below are imported on first use, not with the package: the CLI imports
:mod:`~protofly.admin.commands` for every ``protofly`` invocation, and ``--help`` must not load aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from protofly.admin.protocol import ENV_ADMIN, SOCKET_NAME, AdminError, AdminUnavailableError, admin_socket

if TYPE_CHECKING:
    from protofly.admin.client import AdminClient
    from protofly.admin.server import AdminServer
    from protofly.admin.views import stub_view

__all__ = [
    "ENV_ADMIN",
    "SOCKET_NAME",
    "AdminClient",
    "AdminError",
    "AdminServer",
    "AdminUnavailableError",
    "admin_socket",
    "stub_view",
]

_LAZY = {
    "AdminClient": "protofly.admin.client",
    "AdminServer": "protofly.admin.server",
    "stub_view": "protofly.admin.views",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
