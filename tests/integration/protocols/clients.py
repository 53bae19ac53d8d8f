"""The users on the other side: a plain slixmpp client and a local stand-in hyperty, both outside any sandbox."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import slixmpp

from protofly.message import Message
from protofly.runtime import Runtime

#: The published stub packages of this repository.
STUBS = Path(__file__).resolve().parents[3] / "stubs"


class PlainXmpp(slixmpp.ClientXMPP):
    """A plain XMPP user of the test server, in the test process: collects the chat lines it receives."""

    def __init__(self, jid: str, password: str, port: int, *, echo: bool = False) -> None:
        super().__init__(jid, password)
        self.port = port
        self.echo = echo
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        self.lines: list[tuple[str, str]] = []
        self.presence: list[tuple[str, str]] = []
        self.changed = asyncio.Event()
        self.add_event_handler("message", self._message)
        self.add_event_handler("presence_available", lambda p: self._presence(p, "available"))
        self.add_event_handler("presence_unavailable", lambda p: self._presence(p, "unavailable"))

    async def start(self, timeout: float = 5.0) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", lambda _e: started.done() or started.set_result(None))
        self.connect("127.0.0.1", self.port)
        await asyncio.wait_for(started, timeout)
        self.send_presence()
        await self.get_roster(timeout=timeout)

    async def stop(self) -> None:
        self.disconnect(wait=1.0)
        await asyncio.wait_for(self.disconnected, 5)

    def _message(self, stanza: Any) -> None:
        if stanza["type"] in ("chat", "normal") and stanza["body"]:
            self.lines.append((str(stanza["from"].bare), str(stanza["body"])))
            self.changed.set()
            if self.echo:
                self.send_message(mto=stanza["from"].bare, mbody=f"re: {stanza['body']}", mtype="chat")

    def _presence(self, presence: Any, state: str) -> None:
        self.presence.append((str(presence["from"].bare), state))
        self.changed.set()

    async def wait_lines(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.lines) < count:
                self.changed.clear()
                await self.changed.wait()


class LocalHyperty:
    """A hyperty address of the runtime with an inbox (no message node needed: the runtime declares it local)."""

    def __init__(self, runtime: Runtime, url: str = "hyperty://a.test/alice-app") -> None:
        self.runtime = runtime
        self.url = url
        self.inbox: list[Message] = []
        self.arrived = asyncio.Event()
        runtime.registry.add_local(url)
        runtime.bus.add_listener(url, self._receive)

    def _receive(self, msg: Message) -> None:
        self.inbox.append(msg)
        self.arrived.set()

    async def request(
        self, to: str, type: str = "create", body: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Message:
        return await self.runtime.bus.request(Message(type=type, from_=self.url, to=to, body=body), timeout)

    async def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(self.inbox) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.inbox
