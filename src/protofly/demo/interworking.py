"""The demo's two interworking domains: ``chat.test`` (XMPP, Prosody) and ``iot.test`` (MQTT, Mosquitto).

Each is a domain whose back-end nobody here wrote: a Debian server started in the foreground on 127.0.0.1
(:mod:`protofly.demo.backends`), and a catalogue serving that domain's signed stub (``stubs/xmpp``,
``stubs/mqtt``) whose configuration and ``egress`` name the server's run-time port.  Runtime A's user has
an account on each (the credentials file this module writes); the users on the other side are plain
clients in the demo process: an XMPP user who answers every chat line, and an MQTT sensor.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiomqtt
import slixmpp

from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.demo.backends import Mosquitto, Prosody

__all__ = ["EchoUser", "Interworking"]

#: Runtime A's accounts on the two back-ends, and the plain users on the other side.
ACCOUNTS = {
    "chat.test": {"jid": "alice@chat.test", "password": "alice-demo-pw"},
    "iot.test": {"username": "alice", "password": "alice-demo-pw", "clientId": "protofly-demo-alice"},
}
BOB = ("bob@chat.test", "bob-demo-pw")
SENSOR = ("sensor", "sensor-demo-pw")


class EchoUser(slixmpp.ClientXMPP):
    """A plain XMPP user (no reTHINK anywhere) who answers each chat line; ``heard`` collects what came in."""

    def __init__(self, jid: str, password: str, port: int) -> None:
        super().__init__(jid, password)
        self.port = port
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        self.heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=100)
        self.add_event_handler("message", self._answer)

    async def start(self, timeout: float = 5.0) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_start(_event: Any) -> None:
            if not started.done():
                started.set_result(None)

        self.add_event_handler("session_start", on_start)
        self.connect("127.0.0.1", self.port)
        await asyncio.wait_for(started, timeout)
        self.send_presence()

    async def stop(self) -> None:
        self.disconnect(wait=1.0)
        await asyncio.wait_for(self.disconnected, 5)

    def _answer(self, stanza: Any) -> None:
        if stanza["type"] in ("chat", "normal") and stanza["body"]:
            sender, text = str(stanza["from"].bare), str(stanza["body"])
            if not self.heard.full():
                self.heard.put_nowait((sender, text))
            self.send_message(mto=stanza["from"].bare, mbody=f"hi, {sender.split('@')[0]}! you said: {text}")


class Interworking:
    """Prosody, Mosquitto and the two catalogues; ``async with`` starts them and stops them by pid."""

    def __init__(self, root: Path, trust: TrustStore, stubs: Path) -> None:
        self.root = root
        self.trust = trust
        self.stubs = stubs
        self.prosody = Prosody(root / "prosody")
        self.mosquitto = Mosquitto(root / "mosquitto")
        self.catalogues: dict[str, CatalogueServer] = {}
        self.credentials_file = root / "credentials.json"

    async def __aenter__(self) -> Interworking:
        try:
            # one writer per server at a time: two mosquitto_passwd runs on one file would lose a user
            await asyncio.gather(self._register(), self._add_users())
            await asyncio.gather(self.prosody.start(), self.mosquitto.start())
            await self._publish("chat.test", "xmpp", self.prosody.endpoint)
            await self._publish("iot.test", "mqtt", self.mosquitto.endpoint)
            self.credentials_file.write_text(json.dumps(ACCOUNTS))
        except BaseException:
            await self.close()
            raise
        return self

    async def _register(self) -> None:
        await self.prosody.register("alice", ACCOUNTS["chat.test"]["password"])
        await self.prosody.register(BOB[0].split("@")[0], BOB[1])

    async def _add_users(self) -> None:
        await self.mosquitto.add_user(ACCOUNTS["iot.test"]["username"], ACCOUNTS["iot.test"]["password"])
        await self.mosquitto.add_user(*SENSOR)

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _publish(self, domain: str, stub: str, server: str) -> None:
        key = SigningKey.generate(domain)
        self.trust.add(domain, key.public_raw)
        package = self.root / domain / "package"
        shutil.copytree(self.stubs / stub, package)
        template = json.loads((package / "descriptor.json").read_text())
        template["configuration"] = {**template["configuration"], "server": server, "domain": domain}
        template["egress"] = [server]
        (package / "descriptor.json").write_text(json.dumps(template, indent=2))
        publish(package, self.root / domain / "catalogue", key, domain)
        catalogue = CatalogueServer(self.root / domain / "catalogue", default="default")
        await catalogue.start()
        self.catalogues[domain] = catalogue

    def catalogue_urls(self) -> dict[str, str]:
        return {domain: server.base_url for domain, server in self.catalogues.items()}

    def server_pids(self) -> dict[str, int | None]:
        return {"prosody": self.prosody.pid, "mosquitto": self.mosquitto.pid}

    def bob(self) -> EchoUser:
        return EchoUser(BOB[0], BOB[1], self.prosody.port)

    def sensor(self) -> aiomqtt.Client:
        """A plain MQTT client (no reTHINK anywhere) publishing as the ``sensor`` user."""
        return aiomqtt.Client(
            "127.0.0.1",
            self.mosquitto.port,
            username=SENSOR[0],
            password=SENSOR[1],
            identifier="demo-sensor",
            timeout=5,
        )

    async def close(self) -> None:
        for catalogue in self.catalogues.values():
            await catalogue.stop()
        await asyncio.gather(self.prosody.stop(), self.mosquitto.stop())
