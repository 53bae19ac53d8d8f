"""Test stub: carries messages to a TCP back-end as JSON lines (configuration ``host``/``port``, declared in
the descriptor's ``egress`` as ``tcp://host:port``).

``configuration.mode`` makes it misbehave on purpose: ``raise-in-activate`` (fails while being created),
``never-live`` (its connect never finishes).  The back-end can tell it to crash (``{"command": "crash"}``),
and it sends the credentials it was connected with in its first line, so a test can check they arrived.
"""

from __future__ import annotations

import asyncio
import json
import os

from protofly.stub import Message, ProtoStub, as_dict


class LineStub(ProtoStub):
    def __init__(self, url: str, bus, config: dict) -> None:
        if config.get("mode") == "raise-in-activate":
            raise RuntimeError("refusing to start in test mode")
        super().__init__(url, bus, config)
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self, credentials: dict | None = None) -> None:
        if self.config.get("mode") == "never-live":
            await asyncio.Event().wait()
        # No network of its own: the runtime opens the endpoint its descriptor declares and passes the socket.
        sock = await self.open_connection(f"tcp://{self.config['host']}:{self.config['port']}")
        reader, writer = await asyncio.open_connection(sock=sock)
        self._writer = writer
        writer.write(json.dumps({"hello": self.url, "credentials": credentials}).encode() + b"\n")
        await writer.drain()
        self.bus.spawn(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            data = json.loads(line)
            if data.get("command") == "crash":
                os._exit(3)
            self.deliver(data)
        self._writer = None
        self.status("disconnected", "back-end closed the connection")

    def on_message(self, msg: Message) -> None:
        if self._writer is not None:
            self._writer.write(json.dumps(as_dict(msg)).encode() + b"\n")
