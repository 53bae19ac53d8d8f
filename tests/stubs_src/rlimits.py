"""Test stub: answers every message with the resource limits its own process runs under.

Lets a test check, from inside the stub, what the sandbox really applied (e.g. a descriptor's
``sandbox.memoryMB``).  Data for the tests: read as bytes and deployed, never imported.
"""

import resource

from protofly.stub import Message, ProtoStub


class RlimitsStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        body = {
            "code": 200,
            "value": {
                "RLIMIT_AS": list(resource.getrlimit(resource.RLIMIT_AS)),
                "RLIMIT_NOFILE": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            },
        }
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
