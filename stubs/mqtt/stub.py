"""An interworking stub for MQTT 3.1.1: reTHINK resources as MQTT topics, via aiomqtt (paho-mqtt).

The other side is any MQTT client of the domain's broker (Mosquitto in the tests and the demo): sensors and
dashboards that know nothing of reTHINK.  The runtime's user logs in with the credentials the identity
module holds for the domain (``{"username": ..., "password": ..., "clientId": ...}``).

Addresses (``docs/protocols.md``): ``mqtt://iot.test/<topic>`` is the resource of MQTT topic ``<topic>``
of domain ``iot.test`` (a subscription may use the wildcards ``+`` and ``#``, written as they are).

* ``subscribe`` from a hyperty to a resource → an MQTT subscription (QoS 1) to that topic filter; every
  MQTT publish matching it becomes an ``update`` from ``mqtt://iot.test/<topic>`` to the hyperty, with
  ``body.value`` the payload (JSON when it parses, else text) and ``body.topic``/``body.retained``;
  ``unsubscribe`` ends it;
* ``create``/``update`` to a resource → a QoS 1 publish of ``body.value`` (JSON-encoded unless a string),
  retained when the topic matches one of the configuration's ``stateTopics`` filters (the resource is
  state: a late subscriber wants its last value) and not retained otherwise (an event); the answer
  (``200``) comes with the broker's PUBACK, so an accepted publish is the broker's.  A publish the
  connection loss interrupted is sent again after the reconnection (at least once); after
  ``deliveryTimeout`` seconds without a broker it is answered ``504``.
* the session is persistent (clean session off, a fixed client id): what is published to the stub's
  subscriptions while it reconnects waits at the broker and arrives afterwards.

The stub has no network of its own.  aiomqtt (through paho-mqtt) dials its broker itself, from a worker
thread; this stub gives each connection attempt the socket the runtime opened for it (``open_connection``)
by replacing paho's socket factory on that one client object (paho has no public hook for a pre-connected
socket; the override is one attribute, checked by the tests against the pinned versions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.client import topic_matches_sub

from protofly.backoff import Backoff
from protofly.message import Message, response
from protofly.stub import AuthenticationFailed, Bus, ProtoStub, summary

__all__ = ["MqttStub", "topic_of"]

_log = logging.getLogger("protofly.stubs.mqtt")

#: What ``save_state`` may hold (the runtime's limit is 64 KiB).
_STATE_LIMIT = 60_000

#: CONNACK refusals that are about the credentials (MQTT 3.1.1 codes 4 and 5, and their MQTT 5 reason codes).
_AUTH_REFUSALS = frozenset({4, 5, 134, 135})


def topic_of(address: str, domain: str) -> str | None:
    """The MQTT topic (filter) a resource address names: ``mqtt://iot.test/a/b`` → ``a/b``; None if not ours.

    Split by hand, not with ``urlsplit``: ``#`` (the multi-level wildcard) would be read as a fragment.
    """
    scheme, sep, rest = address.partition("://")
    if scheme != "mqtt" or not sep:
        return None
    host, slash, topic = rest.partition("/")
    if host.lower() != domain or not slash or not topic:
        return None
    return topic


def _payload(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


def _value(payload: bytes) -> Any:
    text = payload.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class MqttStub(ProtoStub):
    """The asyncio shell: one aiomqtt client per connection, a reader loop, publishes racing the connection's end."""

    def __init__(self, url: str, bus: Bus, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, bus, config)
        cfg = self.config
        self.server = str(cfg.get("server", ""))
        parts = urlsplit(self.server)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"configuration 'server': expected tcp://host:port, got {self.server!r}")
        self.host, self.port = parts.hostname, parts.port
        self.domain = str(cfg.get("domain", "")).lower()
        if not self.domain:
            raise ValueError("configuration 'domain': the domain this stub serves is missing")
        self.state_topics = [str(t) for t in cfg.get("stateTopics", ["state/#"])]
        self.connect_timeout = float(cfg.get("connectTimeout", 5.0))
        self.delivery_timeout = float(cfg.get("deliveryTimeout", 30.0))
        self.keepalive = int(cfg.get("keepalive", 30))
        self.pending_limit = int(cfg.get("outboxMessages", 10_000))
        self._backoff = Backoff(float(cfg.get("backoffBase", 0.1)), float(cfg.get("backoffCap", 2.0)))
        self._credentials: Mapping[str, Any] | None = None
        self._client: aiomqtt.Client | None = None
        self._lost: asyncio.Future[None] | None = None
        self._up = asyncio.Event()
        self._session = 0
        self._pending = 0
        self._filters: dict[str, set[str]] = {}  # topic filter → subscribed hyperties
        saved = self.saved_state.get("filters") if isinstance(self.saved_state, dict) else None
        if isinstance(saved, dict):  # a restarted stub: the broker kept the session, this keeps its hyperties
            self._filters = {str(f): {str(h) for h in hs} for f, hs in saved.items() if isinstance(hs, list)}
        self._loop_task: asyncio.Task[None] | None = None

    # -- connection ------------------------------------------------------------------------------

    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        if credentials is not None:
            self._credentials = credentials
        client = await self._open()
        self._start(client)

    async def _open(self) -> aiomqtt.Client:
        """One connection: socket from the runtime, CONNECT with the credentials, CONNACK; raises on refusal."""
        creds = self._credentials or {}
        username, password = creds.get("username"), creds.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise AuthenticationFailed(f"no MQTT account for {self.domain} (credentials need 'username', 'password')")
        client_id = str(creds.get("clientId") or f"protofly-{username}")
        sock = await self.open_connection(self.server)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small packets, acknowledged: no Nagle delay
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=username,
            password=password,
            identifier=client_id,
            clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311,
            keepalive=self.keepalive,
            timeout=self.connect_timeout,
            max_inflight_messages=1000,
            max_queued_incoming_messages=10_000,
        )
        _use_socket(client, sock)
        try:
            await asyncio.wait_for(client.__aenter__(), self.connect_timeout)
        except aiomqtt.MqttCodeError as exc:
            sock.close()
            code = getattr(exc.rc, "value", exc.rc)
            if code in _AUTH_REFUSALS:
                raise AuthenticationFailed(f"{self.domain} refused the login of {username}: {exc}") from None
            raise ConnectionError(f"{self.domain}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return client

    def _start(self, client: aiomqtt.Client) -> None:
        self._session += 1
        self._client = client
        self._lost = asyncio.get_running_loop().create_future()
        self._up.set()
        self._backoff.reset()
        self._loop_task = self.bus.spawn(self._read(client, self._lost, self._session))

    async def _read(self, client: aiomqtt.Client, lost: asyncio.Future[None], session: int) -> None:
        """Resubscribe, then hand every publish to the subscribed hyperties until the connection ends."""
        try:
            for topic_filter in list(self._filters):
                await client.subscribe(topic_filter, qos=1)
            async for message in client.messages:
                self._on_publish(message)
        except aiomqtt.MqttError as exc:
            _log.info("mqtt stub: connection to %s lost: %s", self.domain, summary(exc))
        finally:
            if not lost.done():
                lost.set_result(None)
        if session == self._session and not self._disconnected_on_request:
            self._up.clear()
            self._client = None
            self.status("disconnected", f"{self.domain}: connection lost")
            await self._reconnect()

    async def _reconnect(self) -> None:
        while not self._disconnected_on_request:
            await asyncio.sleep(self._backoff.next())
            self.status("in-progress", f"reconnecting to {self.domain}")
            try:
                client = await self._open()
            except AuthenticationFailed as exc:
                self.status("failed", str(exc))
                return
            except (OSError, TimeoutError, aiomqtt.MqttError) as exc:
                self.status("disconnected", summary(exc))
                continue
            self._start(client)
            self.status("live")
            return

    def needs_connect(self) -> bool:
        # While it reconnects by itself the stub holds publishes until the broker is back; no second connection.
        if self._loop_task is not None and not self._loop_task.done():
            return False
        return super().needs_connect()

    async def disconnect(self) -> None:
        self._session += 1
        client, self._client = self._client, None
        self._up.clear()
        if client is not None:
            try:
                await asyncio.wait_for(client.__aexit__(None, None, None), self.connect_timeout)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                _log.info("mqtt stub: unclean disconnect from %s: %s", self.domain, summary(exc))
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.status("disconnected", "on request")

    # -- runtime → MQTT --------------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        topic = topic_of(msg.to, self.domain)
        if topic is None:
            self.bus.post(response(msg, 404, f"{msg.to} names no MQTT topic of {self.domain}"))
            return
        if msg.type == "subscribe":
            self.bus.spawn(self._subscribe(msg, topic))
        elif msg.type == "unsubscribe":
            self.bus.spawn(self._unsubscribe(msg, topic))
        elif msg.type in ("create", "update"):
            if "#" in topic or "+" in topic:
                self.bus.post(response(msg, 400, f"cannot publish to the topic filter {topic!r}"))
            elif self._pending >= self.pending_limit:
                self.bus.post(response(msg, 503, f"mqtt stub: {self.pending_limit} publishes await the broker"))
            else:
                value = (msg.body or {}).get("value")
                retain = any(topic_matches_sub(f, topic) for f in self.state_topics)
                self._pending += 1
                self.bus.spawn(self._publish(msg, topic, _payload(value), retain))
        else:
            self.bus.post(response(msg, 405, f"mqtt stub: {msg.type} is not mapped (subscribe, create, update)"))

    def _save_filters(self) -> None:
        """Leave the subscriptions to the next instance (after a crash the broker's session still holds them)."""
        state = {"filters": {f: sorted(hs) for f, hs in self._filters.items()}}
        if len(json.dumps(state)) <= _STATE_LIMIT:
            self.save_state(state)
        else:
            _log.warning("mqtt stub: %d subscriptions are too many to hand to a restarted stub", len(self._filters))

    async def _subscribe(self, msg: Message, topic: str) -> None:
        first = topic not in self._filters
        self._filters.setdefault(topic, set()).add(msg.from_)
        self._save_filters()
        client = self._client
        if first and client is not None:
            try:
                await client.subscribe(topic, qos=1)
            except aiomqtt.MqttError as exc:  # the reconnection subscribes again (the session keeps it anyway)
                _log.info("mqtt stub: subscribe %s deferred to the reconnection: %s", topic, summary(exc))
        self.bus.post(response(msg, 200, value={"topic": topic}))

    async def _unsubscribe(self, msg: Message, topic: str) -> None:
        hyperties = self._filters.get(topic, set())
        hyperties.discard(msg.from_)
        if not hyperties:
            self._filters.pop(topic, None)
        self._save_filters()
        client = self._client
        if not hyperties and client is not None:
            try:
                await client.unsubscribe(topic)
            except aiomqtt.MqttError as exc:
                _log.info("mqtt stub: unsubscribe %s failed: %s", topic, summary(exc))
        self.bus.post(response(msg, 200))

    async def _publish(self, msg: Message, topic: str, payload: bytes, retain: bool) -> None:
        """Publish until the broker acknowledges it (PUBACK), across reconnections, within ``deliveryTimeout``."""
        try:
            async with asyncio.timeout(self.delivery_timeout):
                while True:
                    await self._up.wait()
                    client, lost = self._client, self._lost
                    if client is None or lost is None:
                        continue
                    attempt = asyncio.ensure_future(client.publish(topic, payload, qos=1, retain=retain, timeout=None))
                    await asyncio.wait((attempt, lost), return_when=asyncio.FIRST_COMPLETED)
                    if attempt.done() and attempt.exception() is None:
                        break
                    attempt.cancel()
                    if self._client is client:  # refused without losing the connection: wait for the loss
                        await asyncio.wait((lost,), timeout=1.0)
        except TimeoutError:
            self.bus.post(response(msg, 504, f"{self.domain}: no broker acknowledgement in {self.delivery_timeout} s"))
            return
        finally:
            self._pending -= 1
        self.bus.post(response(msg, 200, value={"topic": topic, "retained": retain}))

    # -- MQTT → runtime --------------------------------------------------------------------------

    def _on_publish(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        value = _value(payload)
        targets = sorted({h for f, hs in self._filters.items() if topic_matches_sub(f, topic) for h in hs})
        for target in targets:
            self.deliver(
                Message(
                    type="update",
                    from_=f"mqtt://{self.domain}/{topic}",
                    to=target,
                    body={"value": value, "topic": topic, "retained": bool(message.retain)},
                )
            )


def _use_socket(client: aiomqtt.Client, sock: socket.socket) -> None:
    """Make paho use ``sock`` (connected by the runtime) instead of dialling the broker itself."""
    paho = client._client
    if not callable(getattr(paho, "_create_socket_connection", None)):
        raise RuntimeError("this paho-mqtt has no _create_socket_connection; the stub cannot hand it a socket")
    paho._create_socket_connection = lambda: sock  # type: ignore[method-assign]
