"""Test stub: its "back-end" accepts only ``{"password": "right"}`` and refuses anything else as a server would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protofly.stub import AuthenticationFailed, Message, ProtoStub


class PickyStub(ProtoStub):
    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        self.status("in-progress")
        if not credentials or credentials.get("password") != "right":
            self.status("failed", "the server said: not authorized")
            raise AuthenticationFailed("the server refused the password")
        self.status("live")

    def on_message(self, msg: Message) -> None:
        if msg.type != "response":
            self.bus.post(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body={"code": 200}))
