"""Echo: the smallest useful protocol stub, used by the catalogue's tests and as a packaging example.

It has no back-end: every message the runtime routes to it comes back as a ``response`` with code 200
and the original body under ``value``, as if a remote domain had answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protofly.stub import Message, ProtoStub


class EchoStub(ProtoStub):
    """Answers each request itself; ``configuration.greeting`` is added to every answer."""

    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        return None

    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        self.deliver(
            {
                "id": msg.id,
                "type": "response",
                "from": msg.to,
                "to": msg.from_,
                "body": {"code": 200, "value": msg.body or {}, "greeting": self.config.get("greeting", "echo")},
            }
        )
