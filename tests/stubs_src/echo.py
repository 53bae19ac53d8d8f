"""Test stub: answers every message by sending it back to its sender (swapping from and to).

Data for the sandbox tests: read as bytes and deployed, never imported.
"""

from protofly.stub import Message, ProtoStub


class EchoStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        body = {"code": 200, "echo": msg.body}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
