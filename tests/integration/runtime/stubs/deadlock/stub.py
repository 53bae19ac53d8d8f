"""Hostile test stub: goes live, then deadlocks its event loop on the first message.

It takes a lock it already holds, so the loop stops without using CPU: the CPU limit never fires, the
process stays alive, and only the runtime's liveness ping can tell that nothing runs any more.
"""

from __future__ import annotations

import threading

from protofly.stub import Message, ProtoStub


class DeadlockStub(ProtoStub):
    def on_message(self, msg: Message) -> None:
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # never returns: the stub's loop is blocked for good
