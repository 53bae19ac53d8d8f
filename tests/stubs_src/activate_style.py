"""Test stub in the reTHINK module style: activate(url, bus, config), no ProtoStub base class.

It listens on "*" and answers every message with a response that carries the configuration it was given.
"""


class PlainStub:
    def __init__(self, url, bus, config):
        self.url = url
        self.bus = bus
        self.config = config
        bus.add_listener("*", self.on_bus)
        bus.post({"type": "update", "from": url, "to": url + "/status", "body": {"value": "created"}})

    def on_bus(self, msg):
        reply = {
            "id": msg.id,
            "type": "response",
            "from": msg.to,
            "to": msg.from_,
            "body": {"code": 200, "config": self.config, "via": self.url},
        }
        self.bus.post(reply)

    def ping(self, word):
        return f"pong {word}"


def activate(url, bus, config):
    return {"name": "PlainStub", "instance": PlainStub(url, bus, config)}
