"""The reference reTHINK message node: the back-end server that protocol stubs connect to.

It speaks the Vert.x message node protocol over WebSocket (``docs/msgnode.md``).  The protocol lives in
the sans-I/O :class:`MessageNodeCore`; :class:`MessageNode` is the aiohttp shell that serves it (imported
on first use, so that the CLI and the core do not pay for aiohttp).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protofly.msgnode.core import (
    SESSION_URL,
    Close,
    Drained,
    EnableBatch,
    MessageNodeCore,
    Replay,
    Send,
    Session,
    SessionEnded,
    StateError,
)

if TYPE_CHECKING:
    from protofly.msgnode.server import MessageNode

__all__ = [
    "SESSION_URL",
    "Close",
    "Drained",
    "EnableBatch",
    "MessageNode",
    "MessageNodeCore",
    "Replay",
    "Send",
    "Session",
    "SessionEnded",
    "StateError",
]


def __getattr__(name: str) -> Any:
    if name == "MessageNode":
        from protofly.msgnode.server import MessageNode

        return MessageNode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
