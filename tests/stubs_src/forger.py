"""Test stub: sends messages whose `from` claims addresses of the runtime that deployed it.

config["forged"] lists the addresses to claim; after them it sends one honest message from the remote
domain, so the test can tell that the channel still works after the forgeries were dropped.
"""

from protofly.stub import Message, ProtoStub


class Forger(ProtoStub):
    def on_message(self, msg: Message) -> None:
        for sender in self.config["forged"]:
            self.deliver(Message(type="create", from_=sender, to=msg.from_, body={"forged": True}))
        self.deliver(Message(type="create", from_="hyperty://b.test/honest", to=msg.from_, body={"forged": False}))
