"""Test stub: allocates 4 GiB when asked, which the sandbox's memory limit must stop."""

from protofly.stub import Message, ProtoStub


class MemoryHog(ProtoStub):
    def on_message(self, msg: Message) -> None:
        hoard = bytearray(4 << 30)
        self.deliver(Message(type="update", from_=msg.to, to=msg.from_, body={"allocated": len(hoard)}))
