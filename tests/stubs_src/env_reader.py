"""Test stub: answers any message with what it can see of its process (environment, cwd, identity)."""

import os

from protofly.stub import Message, ProtoStub


class EnvReader(ProtoStub):
    def on_message(self, msg: Message) -> None:
        name = (msg.body or {}).get("name", "")
        body = {
            "code": 200,
            "value": os.environ.get(name),
            "environ": dict(os.environ),
            "cwd": os.getcwd(),
        }
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
