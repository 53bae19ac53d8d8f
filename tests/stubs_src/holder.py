"""Honest test stub (the victim's domain): holds requests until released, and remembers what reached it.

* a request to ``.../release`` answers every held request with ``200 {"real": true}`` (``from`` = the
  address each was sent to), then itself with the number released;
* a request to ``.../log`` is answered with every message that reached the stub so far (``to``, ``from``,
  ``type``, ``id``), so a test can see from the victim's side whether anything foreign got in;
* any other request is held; other messages are only remembered.
"""

from protofly.stub import Message, ProtoStub

_REMEMBERED = 1000


class Holder(ProtoStub):
    def __init__(self, url, bus, config=None):
        super().__init__(url, bus, config)
        self.held = []
        self.seen = []

    def on_message(self, msg: Message) -> None:
        if len(self.seen) < _REMEMBERED:
            self.seen.append({"to": msg.to, "from": msg.from_, "type": msg.type, "id": msg.id})
        if msg.type == "response":
            return
        if msg.to.endswith("/release"):
            for request in self.held:
                self.deliver(self._answer(request, {"real": True}))
            self.deliver(self._answer(msg, {"released": len(self.held)}))
            self.held = []
        elif msg.to.endswith("/log"):
            self.deliver(self._answer(msg, {"seen": self.seen}))
        else:
            self.held.append(msg)

    @staticmethod
    def _answer(request, value):
        return Message(
            id=request.id,
            type="response",
            from_=request.to,
            to=request.from_,
            body={"code": 200, "value": value},
        )
