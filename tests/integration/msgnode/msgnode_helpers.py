"""Constants and the stub-like ``websockets`` client of the message node's integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

DOMAIN = "b.test"
SESSION = "mn:/session"
ALLOC = f"domain://msg-node.{DOMAIN}/address-allocation"
HYPERTY_ALLOC = f"domain://msg-node.{DOMAIN}/hyperty-address-allocation"
OBJECT_ALLOC = f"domain://msg-node.{DOMAIN}/object-address-allocation"
SM = f"domain://msg-node.{DOMAIN}/sm"
WAIT = 5.0


def is_draining(msg: dict[str, Any]) -> bool:
    return msg.get("from") == SESSION and msg.get("type") == "update" and msg.get("body") == {"value": "draining"}


class Client:
    """A stub-like client: a reader task files every message (arrays unpacked) for :meth:`next` to find.

    With ``auto_drain`` it answers the node's ``draining`` with ``drained`` at once (it sends nothing
    else on its own, so that is its last frame), as a drain-extension stub with an empty outbox would.
    """

    def __init__(self, ws: ClientConnection, *, auto_drain: bool = False) -> None:
        self.ws = ws
        self.auto_drain = auto_drain
        self.ids = itertools.count(1)
        self.inbox: list[dict[str, Any]] = []
        self.frames = 0
        self.arrays = 0
        self.runtime = ""
        self.session_url = ""
        self._arrived = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in self.ws:
                obj = json.loads(data)
                self.frames += 1
                if isinstance(obj, list):
                    self.arrays += 1
                    self.inbox.extend(obj)
                else:
                    self.inbox.append(obj)
                if self.auto_drain and not isinstance(obj, list) and is_draining(obj):
                    await self.drained()
                self._arrived.set()
        self._arrived.set()

    async def drained(self) -> None:
        """The drain extension's last frame."""
        await self.send(id=next(self.ids), type="update", from_=self.session_url, to=SESSION, body={"value": "drained"})

    async def next(self, predicate: Callable[[dict[str, Any]], bool] = lambda m: True, timeout: float = WAIT) -> dict:
        """Remove and return the first message matching ``predicate``, waiting at most ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                for index, msg in enumerate(self.inbox):
                    if predicate(msg):
                        return self.inbox.pop(index)
                if self._reader.done():
                    raise ConnectionError(f"connection closed ({self.ws.close_code}) while waiting")
                self._arrived.clear()
                await self._arrived.wait()

    async def send(self, **fields: Any) -> dict[str, Any]:
        fields["from"] = fields.pop("from_")
        await self.ws.send(json.dumps(fields))
        return fields

    async def request(self, **fields: Any) -> dict[str, Any]:
        """Send a request and return its response (matched on id and on our ``from``)."""
        fields.setdefault("id", next(self.ids))
        sent = await self.send(**fields)
        return await self.next(
            lambda m: m.get("type") == "response" and m.get("id") == sent["id"] and m.get("to") == sent["from"]
        )

    async def open(self, runtime: str, **body: Any) -> dict[str, Any]:
        reply = await self.request(type="open", from_=runtime, to=SESSION, **({"body": body} if body else {}))
        if reply["body"]["code"] == 200:
            self.runtime = runtime
            self.session_url = f"{runtime}/{reply['body']['runtimeToken']}"
        return reply

    async def reopen(self, session_url: str, **body: Any) -> dict[str, Any]:
        reply = await self.request(type="re-open", from_=session_url, to=SESSION, **({"body": body} if body else {}))
        if reply["body"]["code"] == 200:
            self.session_url = session_url
            self.runtime = session_url.rsplit("/", 1)[0]
        return reply

    async def allocate(self, to: str = ALLOC, **body: Any) -> list[str]:
        reply = await self.request(type="create", from_=f"{self.runtime}/registry", to=to, body=body)
        assert reply["body"]["code"] == 200, reply
        return reply["body"]["value"]["allocated"]

    async def closed(self, timeout: float = WAIT) -> int | None:
        """Wait for the node to close the socket; its close code."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
        return self.ws.close_code

    async def aclose(self) -> None:
        if self._reader.done():  # gone, or deliberately not reading: no close handshake to wait for
            self.ws.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=1)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
