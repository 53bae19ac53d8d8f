"""The reference reTHINK message node: the back-end server that protocol stubs connect to.

It speaks the Vert.x message node protocol over WebSocket (``docs/msgnode.md``).  The protocol lives in
the sans-I/O :class:`MessageNodeCore` (``core.py``, composing ``session.py``, ``session_manager.py``,
``addresses.py``, ``subscriptions.py``, ``answers.py``, ``snapshot.py``; what it asks the shell to do is
``actions.py``); :class:`MessageNode` is the aiohttp shell that serves it (``server.py``, with ``writer.py``
and ``statefile.py``), imported on first use, so that the CLI and the core do not pay for aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protofly.msgnode.actions import Close, Drained, EnableBatch, Replay, Send, SessionEnded
from protofly.msgnode.core import SESSION_URL, MessageNodeCore
from protofly.msgnode.session import Session
from protofly.msgnode.snapshot import StateError

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
