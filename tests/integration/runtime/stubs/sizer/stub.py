"""Test stub: sends ``body.size`` bytes of padding to ``body.reply_to``, then ``{"after": n}`` to say it is done.

``body.how`` is ``sdk`` (through its bus, as an honest stub does: an oversized post raises in the stub, which
then sends ``{"refused": <error>}``) or ``raw`` (a frame written straight onto the channel, as hostile code
could: only the runtime's side can refuse it).  Frames keep their order on the channel, so ``after`` arrives
after whatever became of the padding.
"""

from __future__ import annotations

import json
import os
import struct
import sys

from protofly.stub import Message, MessageError, ProtoStub, as_dict


class SizerStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        body = msg.body or {}
        padding = Message(type="update", from_=msg.to, to=body["reply_to"], body={"pad": "x" * body["size"]})
        if body["how"] == "raw":
            padding.id = "raw-padding"
            _write_frame(json.dumps(as_dict(padding)).encode())
        else:
            try:
                self.bus.post(padding)
            except MessageError as exc:
                self.bus.post(Message(type="update", from_=msg.to, to=body["reply_to"], body={"refused": str(exc)}))
        self.bus.post(Message(type="update", from_=msg.to, to=body["reply_to"], body={"after": body["size"]}))


def _write_frame(payload: bytes) -> None:
    fd = json.loads(sys.argv[1])["fd"]  # the sandbox host's channel to the runtime
    frame = struct.pack(">I", len(payload)) + payload
    os.set_blocking(fd, True)
    try:
        view = memoryview(frame)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.set_blocking(fd, False)
