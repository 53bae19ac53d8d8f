"""Hostile test stub: floods the runtime with status updates and deliveries as fast as its channel takes them.

The order (a request to any address of the stub's domain) says how many of each:

* ``statuses``: legal transitions of its own status (``disconnected``, ``live``, ``disconnected``, ...);
* ``invalid``: status values no machine accepts;
* ``deliveries``: ``update`` messages from the stub's domain to the hyperty ``to``;
* ``responses``: ``response`` messages to the hyperty ``to`` that answer nothing it asked.

The messages are encoded once into batch frames of ``batch`` messages and written straight onto the
channel's socket (the cheapest flood a stub can produce), then the order is answered with the counts and
the seconds the writing took: everything written before that answer, so the runtime has read it all.
"""

import json
import os
import struct
import sys
import time

from protofly.message import encode
from protofly.stub import Message, ProtoStub


def _frame(messages):
    payload = encode(messages)
    return struct.pack(">I", len(payload)) + payload


def _write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Flood(ProtoStub):
    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        order = msg.body or {}
        batch = order.get("batch", 1000)
        legal = [
            Message(type="update", from_=self.url, to=self.status_url, body={"value": value})
            for value in ["disconnected", "live"] * (batch // 2)
        ]
        invalid = [Message(type="update", from_=self.url, to=self.status_url, body={"value": "no-such-status"})] * batch
        sender = f"hyperty://{msg.to.split('/')[2]}/flood"
        target = order.get("to")
        deliveries = [
            Message(type="update", from_=sender, to=target, body={"n": n}) for n in range(batch if target else 0)
        ]
        stray = [
            Message(id=n + 1, type="response", from_=sender, to=target, body={"code": 200})
            for n in range(batch if target else 0)
        ]
        plan = [
            (_frame(legal), order.get("statuses", 0) // batch),
            (_frame(invalid), order.get("invalid", 0) // batch),
            (_frame(deliveries), order.get("deliveries", 0) // batch),
            (_frame(stray), order.get("responses", 0) // batch),
        ]
        fd = json.loads(sys.argv[1])["fd"]
        os.set_blocking(fd, True)
        started = time.monotonic()
        rounds = max(count for _, count in plan)
        for round_ in range(rounds):
            for frame, count in plan:
                if round_ < count:
                    _write(fd, frame)
        os.set_blocking(fd, False)
        names = ("statuses", "invalid", "deliveries", "responses")
        sent = {name: count * batch for name, (_, count) in zip(names, plan, strict=True)}
        value = {**sent, "seconds": round(time.monotonic() - started, 3)}
        self.bus.post(
            Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body={"code": 200, "value": value})
        )
