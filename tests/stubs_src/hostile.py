"""Hostile test stub: sends whatever messages it is told to, exactly as written, then reports.

A test orders an attack with a request to any address of the stub's domain; its body says what to send:

* ``post``: messages (dicts) posted onto the channel as they are, bypassing the SDK's ``via`` stamping;
* ``exit``: write the messages straight onto the channel's socket, then end the process at once with this
  exit status (``os._exit``), so that they are the last thing the runtime reads from it.

Unless it exits, the stub then answers the order with ``{"posted": n}``: the attack messages were posted
before that answer on the same channel, so when the test has the answer the runtime has seen them all.
"""

import json
import os
import struct
import sys

from protofly.message import encode, from_dict
from protofly.stub import Message, ProtoStub


def _write_frames(messages):
    fd = json.loads(sys.argv[1])["fd"]
    os.set_blocking(fd, True)
    for msg in messages:
        payload = encode(msg)
        view = memoryview(struct.pack(">I", len(payload)) + payload)
        while view:
            view = view[os.write(fd, view) :]


class Hostile(ProtoStub):
    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        order = msg.body or {}
        attack = [from_dict(raw) for raw in order.get("post", [])]
        if "exit" in order:
            _write_frames(attack)
            os._exit(order["exit"])
        for message in attack:
            self.bus.post(message)
        answer = {"code": 200, "value": {"posted": len(attack)}}
        self.bus.post(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=answer))
