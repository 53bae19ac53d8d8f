"""Test stub: goes live, then blocks its own event loop on the first message and never reads again."""

from __future__ import annotations

import time

from protofly.stub import Message, ProtoStub


class BlockerStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        time.sleep(3600)
