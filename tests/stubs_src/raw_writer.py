"""Test stub that bypasses the SDK and writes raw frames onto the sandbox channel, as hostile code could.

It sends an oversized frame, a frame that is not JSON, a batch with one bad message among good ones, and
finally one honest message through the SDK, so the test can check what the runtime dropped and counted.
"""

import json
import os
import struct
import sys

from protofly.stub import Message, ProtoStub


def _frame(payload):
    return struct.pack(">I", len(payload)) + payload


class RawWriter(ProtoStub):
    def on_message(self, msg: Message) -> None:
        fd = json.loads(sys.argv[1])["fd"]
        size = self.config["oversized"]
        good = {"type": "create", "from": "hyperty://b.test/raw", "to": msg.from_, "body": {"n": 1}}
        bad = {"type": "create", "to": msg.from_}
        frames = [
            struct.pack(">I", size) + b"x" * size,
            _frame(b"this is not json"),
            _frame(json.dumps([good, bad]).encode()),
        ]
        os.set_blocking(fd, True)  # the host's asyncio made it non-blocking; a hostile stub does not care
        for frame in frames:
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view) :]
        os.set_blocking(fd, False)
        self.deliver(Message(type="create", from_="hyperty://b.test/raw", to=msg.from_, body={"n": 2}))
