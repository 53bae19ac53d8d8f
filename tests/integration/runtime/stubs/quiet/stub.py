"""Test stub in the reTHINK module style (no ProtoStub): publishes ``live`` on connect and otherwise only when
a message arrives, so its status expires unless traffic refreshes it (the SDK cannot do it on its behalf)."""

from __future__ import annotations

from typing import Any

from protofly.stub import Bus, Message


class QuietStub:
    def __init__(self, url: str, bus: Bus, config: dict[str, Any]) -> None:
        self.url = url
        self.bus = bus
        bus.add_listener("*", self.on_bus)
        self.say("created")

    def say(self, value: str) -> None:
        self.bus.post({"type": "update", "from": self.url, "to": self.url + "/status", "body": {"value": value}})

    async def connect(self, credentials: Any = None) -> None:
        self.say("live")

    async def disconnect(self) -> None:
        self.say("disconnected")

    def on_bus(self, msg: Message) -> None:
        self.say("live")


def activate(url: str, bus: Bus, config: dict[str, Any]) -> dict[str, Any]:
    return {"name": "QuietStub", "instance": QuietStub(url, bus, config)}
