"""Test stub that will not go: its disconnect never returns and it ignores SIGTERM.

remove() must still end it (by SIGKILL) within its grace and escalation periods.
"""

import asyncio
import signal

from protofly.stub import ProtoStub


class Stubborn(ProtoStub):
    def __init__(self, url, bus, config):
        super().__init__(url, bus, config)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def disconnect(self):
        await asyncio.Event().wait()
