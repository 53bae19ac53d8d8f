"""Hostile test stub: goes live, then spins forever on the first message, well under its CPU limit.

The process keeps running and using CPU (the runtime's limit is an hour of it), so neither the CPU limit
nor an exit tells the runtime anything; only the liveness ping, which its blocked loop never answers, does.
"""

from __future__ import annotations

from protofly.stub import Message, ProtoStub


class SpinStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        count = 0
        while True:
            count += 1
