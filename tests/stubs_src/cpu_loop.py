"""Test stub: spins forever when asked, which the sandbox's CPU limit must stop."""

from protofly.stub import Message, ProtoStub


class CpuLoop(ProtoStub):
    def on_message(self, msg: Message) -> None:
        count = 0
        while True:
            count += 1
