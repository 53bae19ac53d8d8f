"""An interworking stub for XMPP (RFC 6120/6121): reTHINK messages to XMPP users, and back, via slixmpp.

The user on the other side is a plain XMPP client (any client of the domain's server, Prosody in the tests
and the demo); the runtime's user logs in as one XMPP account of that domain, with the credentials the
identity module holds for it (``{"jid": "alice@chat.test", "password": ...}``).

Addresses (``docs/protocols.md``): ``xmpp://bob@chat.test`` and reTHINK's user form ``user://chat.test/bob``
both name the XMPP user ``bob@chat.test`` and are served by the stub of ``chat.test``.  A hyperty

* sends a chat line: any ``create``/``update``/``forward`` to a user address whose ``body.value`` holds
  ``text`` (or ``content``); the answer (``200``) comes once the server has *accepted* the stanza, that is
  once it answered an XEP-0199 ping sent after it (a server handles one stream's stanzas in order), so an
  accepted message has been routed or stored offline by the server.  Lines not yet accepted when the
  connection drops are sent again after the reconnection (at least once);
* receives chat lines from XMPP users as ``create`` messages from ``xmpp://<bare jid>``, addressed to the
  hyperty that last wrote to that user, else to the hyperties subscribed to the account's own address;
* subscribes (``subscribe``) to ``xmpp://chat.test/presence`` to get ``update`` messages with the presence
  of the account's contacts (``{"jid", "available", "show", "status"}``); the stub's own status follows its
  own presence: ``live`` while the account is online, ``disconnected`` while it reconnects.

The stub has no network of its own: slixmpp's connection runs over the socket the runtime opens for it
(``open_connection``) to the server its descriptor declares in ``egress``.  TLS: the throw-away servers of
the tests and the demo speak plain XMPP on 127.0.0.1, so ``starttls`` is off by default; a real deployment
declares a ``tls://`` endpoint and the stub wraps the brokered socket itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import slixmpp

from protofly.backoff import Backoff
from protofly.message import Message, response
from protofly.stub import AuthenticationFailed, Bus, ProtoStub, summary

__all__ = ["XmppStub", "jid_of", "user_address"]

_log = logging.getLogger("protofly.stubs.xmpp")

#: The message types that carry a chat line from a hyperty.
_CHAT_TYPES = frozenset({"create", "update", "forward"})


def jid_of(address: str, domain: str) -> str | None:
    """The bare JID an address names: ``xmpp://bob@chat.test`` or ``user://chat.test/bob`` → ``bob@chat.test``.

    None for addresses of this domain that name no user (the presence resource) and for other domains.
    """
    parts = urlsplit(address)
    host = (parts.hostname or "").lower()
    if host != domain:
        return None
    if parts.scheme == "xmpp" and parts.username:
        return f"{parts.username.lower()}@{domain}"
    if parts.scheme == "user":
        name = parts.path.strip("/")
        if name and "/" not in name:
            return f"{name.lower()}@{domain}"
    return None


def user_address(jid: str) -> str:
    """The reTHINK address of an XMPP user: ``xmpp://<bare jid>``."""
    return f"xmpp://{jid.split('/', 1)[0].lower()}"


@dataclass(slots=True)
class _Outgoing:
    """A chat line waiting to be accepted by the server; ``request`` is answered once it is."""

    request: Message
    jid: str
    text: str
    sent_on: int = -1


class _Client(slixmpp.ClientXMPP):
    """slixmpp over one socket the runtime opened: its connect uses that socket instead of dialling."""

    def __init__(self, jid: str, password: str, sock: Any, tls: ssl.SSLContext | None, server_name: str) -> None:
        super().__init__(jid, password)
        self._sock = sock
        self._tls = tls
        self._server_name = server_name
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        # SCRAM over the loopback plain stream of a throw-away server; a tls:// endpoint encrypts it anyway.
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        self.register_plugin("xep_0199", {"keepalive": False})

    async def _attempt_connection(self, host: str, port: int, tls: bool, server_hostname: str | None) -> bool:
        sock, self._sock = self._sock, None
        if sock is None:
            return False
        self.event_when_connected = "connected"
        if self._tls is not None:
            await self.loop.create_connection(lambda: self, sock=sock, ssl=self._tls, server_hostname=self._server_name)
        else:
            await self.loop.create_connection(lambda: self, sock=sock)
        self._connect_loop_wait = 0
        return True


class XmppStub(ProtoStub):
    """The asyncio shell: one slixmpp session at a time, an outbox of unaccepted lines, reconnection with backoff."""

    def __init__(self, url: str, bus: Bus, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, bus, config)
        cfg = self.config
        self.server = str(cfg.get("server", ""))
        if not self.server.startswith(("tcp://", "tls://")):
            raise ValueError(
                f"configuration 'server': expected tcp://host:port or tls://host:port, got {self.server!r}"
            )
        self.domain = str(cfg.get("domain", "")).lower()
        if not self.domain:
            raise ValueError("configuration 'domain': the XMPP domain this stub serves is missing")
        self.presence_url = f"xmpp://{self.domain}/presence"
        self.connect_timeout = float(cfg.get("connectTimeout", 5.0))
        self.outbox_limit = int(cfg.get("outboxMessages", 10_000))
        self._backoff = Backoff(float(cfg.get("backoffBase", 0.1)), float(cfg.get("backoffCap", 2.0)))
        self._credentials: Mapping[str, Any] | None = None
        self._client: _Client | None = None
        self._session = 0
        self._outbox: deque[_Outgoing] = deque()
        self._flushing = False
        self._wake = asyncio.Event()
        self._reconnecting: asyncio.Task[None] | None = None
        self._peers: dict[str, str] = {}  # bare jid → the hyperty that last wrote to it
        self._inbox: set[str] = set()  # hyperties subscribed to the account's own address
        self._presence_subscribers: set[str] = set()
        self._presence: dict[str, dict[str, Any]] = {}
        self._own = ""

    # -- connection ------------------------------------------------------------------------------

    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        if credentials is not None:
            self._credentials = credentials
        creds = self._credentials or {}
        jid, password = creds.get("jid"), creds.get("password")
        if not isinstance(jid, str) or not isinstance(password, str):
            raise AuthenticationFailed(f"no XMPP account for {self.domain} (credentials need 'jid' and 'password')")
        self._own = jid.split("/", 1)[0].lower()
        await self._open(jid, password)
        self._backoff.reset()

    async def _open(self, jid: str, password: str) -> None:
        """One login: socket from the runtime, stream, SASL, bind, initial presence; raises on failure."""
        sock = await self.open_connection(self.server)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # chat lines are small: no Nagle delay
        parts = urlsplit(self.server)
        tls = ssl.create_default_context() if parts.scheme == "tls" else None
        client = _Client(jid, password, sock, tls, self.domain)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[None] = loop.create_future()
        self._session += 1
        session = self._session

        def settle(exc: BaseException | None) -> None:
            if not outcome.done():
                if exc is None:
                    outcome.set_result(None)
                else:
                    outcome.set_exception(exc)

        client.add_event_handler("session_start", lambda _e: settle(None))
        client.add_event_handler(
            "failed_all_auth", lambda _e: settle(AuthenticationFailed(f"{self.domain} refused the login of {jid}"))
        )
        client.add_event_handler(
            "disconnected", lambda _e: settle(ConnectionError(f"{self.domain} closed the stream during login"))
        )
        client.add_event_handler("message", lambda stanza: self._on_stanza(stanza, session))
        client.add_event_handler("presence_available", lambda p: self._on_presence(p, True))
        client.add_event_handler("presence_unavailable", lambda p: self._on_presence(p, False))
        client.connect(parts.hostname, parts.port)
        try:
            await asyncio.wait_for(outcome, self.connect_timeout)
            client.send_presence()
            await client.get_roster(timeout=self.connect_timeout)
        except BaseException:
            client.cancel_connection_attempt()
            client.abort()
            raise
        self._client = client
        client.add_event_handler("disconnected", lambda _e: self._lost(session))
        for item in self._outbox:
            item.sent_on = -1
        self._wake.set()
        self.bus.spawn(self._flush(session))

    def _lost(self, session: int) -> None:
        """The stream of ``session`` ended without a disconnect request: go ``disconnected`` and reconnect."""
        if session != self._session or self._disconnected_on_request:
            return
        self._client = None
        self.status("disconnected", f"{self.domain}: stream closed")
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = self.bus.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        creds = self._credentials or {}
        while not self._disconnected_on_request and self._client is None:
            await asyncio.sleep(self._backoff.next())
            self.status("in-progress", f"reconnecting to {self.domain}")
            try:
                await self._open(str(creds.get("jid")), str(creds.get("password")))
            except AuthenticationFailed as exc:
                self.status("failed", str(exc))
                return
            except (OSError, TimeoutError, slixmpp.xmlstream.xmlstream.NotConnectedError) as exc:
                _log.info("xmpp stub: reconnect to %s failed: %s", self.domain, summary(exc))
                self.status("disconnected", summary(exc))
                continue
            self._backoff.reset()
            self.status("live")

    def needs_connect(self) -> bool:
        # While reconnecting by itself the stub queues lines in its outbox; no second connection from the SDK.
        if self._reconnecting is not None and not self._reconnecting.done():
            return False
        return super().needs_connect()

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        self._session += 1
        if client is not None:
            client.send_presence(ptype="unavailable")
            client.disconnect(wait=1.0)
        self.status("disconnected", "on request")

    # -- runtime → XMPP --------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        if msg.type == "subscribe":
            self._subscribe(msg)
            return
        if msg.type == "unsubscribe":
            self._inbox.discard(msg.from_)
            self._presence_subscribers.discard(msg.from_)
            self.bus.post(response(msg, 200))
            return
        jid = jid_of(msg.to, self.domain)
        if jid is None:
            self.bus.post(response(msg, 404, f"{msg.to} names no XMPP user of {self.domain}"))
            return
        value = (msg.body or {}).get("value")
        text = value.get("text", value.get("content")) if isinstance(value, dict) else value
        if msg.type not in _CHAT_TYPES or not isinstance(text, str):
            self.bus.post(response(msg, 400, "an XMPP chat line is a create/update/forward with body.value.text"))
            return
        if len(self._outbox) >= self.outbox_limit:
            self.bus.post(response(msg, 503, f"xmpp stub outbox full ({self.outbox_limit} lines not yet accepted)"))
            return
        self._peers[jid] = msg.from_
        self._outbox.append(_Outgoing(msg, jid, text))
        self._wake.set()

    def _subscribe(self, msg: Message) -> None:
        if msg.to == self.presence_url:
            self._presence_subscribers.add(msg.from_)
            self.bus.post(response(msg, 200, value={"presence": dict(self._presence)}))
        elif jid_of(msg.to, self.domain) == self._own:
            self._inbox.add(msg.from_)
            self.bus.post(response(msg, 200))
        else:
            self.bus.post(response(msg, 404, f"{msg.to}: subscribe to {self.presence_url} or to the account's address"))

    async def _flush(self, session: int) -> None:
        """Send queued lines, then one ping; lines sent before the ping's answer are accepted and answered."""
        while session == self._session and self._client is not None:
            await self._wake.wait()
            self._wake.clear()
            client = self._client
            if client is None or session != self._session:
                return
            batch = [item for item in self._outbox if item.sent_on != session]
            if not batch:
                continue
            for item in batch:
                client.send_message(mto=slixmpp.JID(item.jid), mbody=item.text, mtype="chat")
                item.sent_on = session
            try:
                await client.plugin["xep_0199"].ping(jid=slixmpp.JID(self.domain), timeout=self.connect_timeout)
            except Exception as exc:  # the stream dropped or the server did not answer: send them again
                _log.info("xmpp stub: no acceptance from %s: %s", self.domain, summary(exc))
                if session != self._session or self._client is None:
                    return  # the reconnection starts a new flush, which sends them first
                for item in batch:
                    item.sent_on = -1
                await asyncio.sleep(self._backoff.next())  # a live stream that did not answer: not in a tight loop
                self._wake.set()
                continue
            accepted = set(map(id, batch))
            kept = deque(item for item in self._outbox if id(item) not in accepted)
            self._outbox = kept
            for item in batch:
                self.bus.post(response(item.request, 200, value={"accepted": True}))
            if any(item.sent_on != session for item in self._outbox):
                self._wake.set()

    # -- XMPP → runtime --------------------------------------------------------------------------

    def _on_stanza(self, stanza: Any, session: int) -> None:
        if stanza["type"] not in ("chat", "normal") or not stanza["body"]:
            return
        sender = str(stanza["from"].bare).lower()
        text = str(stanza["body"])
        targets = {self._peers[sender]} if sender in self._peers else set(self._inbox)
        if not targets:
            _log.warning("xmpp stub: a line from %s has no hyperty to go to (none wrote to it or subscribed)", sender)
            return
        for target in sorted(targets):
            self.deliver(
                Message(
                    type="create",
                    from_=user_address(sender),
                    to=target,
                    body={"value": {"text": text, "jid": str(stanza["from"])}},
                )
            )

    def _on_presence(self, presence: Any, available: bool) -> None:
        jid = str(presence["from"].bare).lower()
        if jid == self._own:
            return
        state = {
            "jid": jid,
            "available": available,
            "show": str(presence["show"] or ""),
            "status": str(presence["status"] or ""),
        }
        self._presence[jid] = state
        for target in sorted(self._presence_subscribers):
            self.deliver(Message(type="update", from_=self.presence_url, to=target, body={"value": state}))
