"""The interworking stubs against their real servers: what the stub costs next to a plain client.

Prosody (``chat.test``) and Mosquitto (``iot.test``) are started on 127.0.0.1 on run-time ports
(:mod:`protofly.demo.backends`), the stubs of ``stubs/xmpp`` and ``stubs/mqtt`` are signed, served by a
catalogue and deployed in process sandboxes by one runtime; the plain clients run in this process.

* ``xmpp_roundtrip_ms_p50/p99``: hyperty → XMPP stub → Prosody → a plain slixmpp user who answers each line
  → Prosody → stub → the answer at the hyperty; 200 sequential round trips after 20 unmeasured.
  ``xmpp_direct_roundtrip_ms_p50``: the same with a plain slixmpp client in the hyperty's place;
* ``xmpp_oneway_msgs_per_s``: 2,000 chat lines posted by the hyperty without waiting, until the plain user
  has them all (in order); ``xmpp_direct_oneway_msgs_per_s``: the same sent by a plain client;
* ``mqtt_roundtrip_ms_p50/p99``: hyperty ``update`` to ``bench/ping`` (QoS 1) → a plain client republishes
  it to ``bench/pong`` → the ``update`` at the hyperty (subscribed); ``mqtt_direct_roundtrip_ms_p50``: a plain
  aiomqtt client in the hyperty's place;
* ``mqtt_oneway_msgs_per_s``: 5,000 QoS 1 publishes from the hyperty until a plain subscriber has them all;
  ``mqtt_direct_oneway_msgs_per_s``: the same from a plain client publishing concurrently;
* ``*_overhead``: stub figure / direct figure (round trip: how many times slower; throughput: fraction kept);
* ``xmpp_cold_deploy_ms_p50``, ``mqtt_cold_deploy_ms_p50``: ``load_stub`` in a fresh runtime (catalogue
  fetch, verification, sandbox, requirements check, login at the server), median of 5.

Prints one JSON object (``{"skipped": ...}`` when a server is not installed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import aiomqtt  # noqa: E402
import slixmpp  # noqa: E402

from protofly.catalogue import SigningKey, TrustStore, publish  # noqa: E402
from protofly.catalogue.server import CatalogueServer  # noqa: E402
from protofly.config import RuntimeConfig  # noqa: E402
from protofly.demo.backends import Mosquitto, Prosody, missing_servers  # noqa: E402
from protofly.message import Message, response_code  # noqa: E402
from protofly.runtime import Runtime  # noqa: E402

WARMUP, ROUNDTRIPS = 20, int(os.environ.get("BENCH_ROUNDTRIPS", "200"))
XMPP_ONEWAY, MQTT_ONEWAY = 2_000, int(os.environ.get("BENCH_MQTT_ONEWAY", "5000"))
DEPLOYS = int(os.environ.get("BENCH_DEPLOYS", "5"))
TIMEOUT = 60.0
CREDENTIALS = {
    "chat.test": {"jid": "alice@chat.test", "password": "alice-pw"},
    "iot.test": {"username": "alice", "password": "alice-pw", "clientId": "bench-alice"},
}


class Xmpp(slixmpp.ClientXMPP):
    """A plain XMPP client; ``echo`` answers every line with the same text."""

    def __init__(self, jid: str, password: str, port: int, *, echo: bool = False) -> None:
        super().__init__(jid, password)
        self.port, self.echo = port, echo
        self.enable_starttls = self.enable_direct_tls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.add_event_handler("message", self._message)

    async def start(self) -> None:
        started = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", lambda _e: started.done() or started.set_result(None))
        self.connect("127.0.0.1", self.port)
        await asyncio.wait_for(started, 10)
        self.send_presence()

    def _message(self, stanza: Any) -> None:
        if stanza["type"] == "chat" and stanza["body"]:
            if self.echo:
                self.send_message(mto=stanza["from"].bare, mbody=stanza["body"], mtype="chat")
            else:
                self.lines.put_nowait(str(stanza["body"]))


class Hyperty:
    """A local hyperty address of the runtime with an inbox queue."""

    def __init__(self, runtime: Runtime, url: str) -> None:
        self.runtime, self.url = runtime, url
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        runtime.registry.add_local(url)
        runtime.bus.add_listener(url, self.inbox.put_nowait)

    async def request(self, to: str, type: str, body: dict[str, Any] | None = None) -> Message:
        answer = await self.runtime.bus.request(Message(type=type, from_=self.url, to=to, body=body), TIMEOUT)
        if response_code(answer) != 200:
            raise RuntimeError(f"{type} {to}: {answer.body}")
        return answer

    def post(self, to: str, type: str, body: dict[str, Any]) -> None:
        self.runtime.bus.post(Message(type=type, from_=self.url, to=to, body=body))


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return round(statistics.median(ordered), 3), round(ordered[int(len(ordered) * 0.99) - 1], 3)


async def timed_roundtrips(one: Any) -> list[float]:
    samples = []
    for n in range(WARMUP + ROUNDTRIPS):
        start = time.perf_counter()
        await one(n)
        if n >= WARMUP:
            samples.append((time.perf_counter() - start) * 1000)
    return samples


async def bench_xmpp(runtime: Runtime, prosody: Prosody) -> dict[str, Any]:
    echo = Xmpp("echo@chat.test", "echo-pw", prosody.port, echo=True)
    sink = Xmpp("sink@chat.test", "sink-pw", prosody.port)
    direct = Xmpp("carol@chat.test", "carol-pw", prosody.port)
    for client in (echo, sink, direct):
        await client.start()
    app = Hyperty(runtime, "hyperty://a.test/bench-xmpp")

    async def via_stub(n: int) -> None:
        app.post("xmpp://echo@chat.test", "create", {"value": {"text": f"ping {n}"}})
        while True:
            msg = await asyncio.wait_for(app.inbox.get(), TIMEOUT)
            if msg.type == "create" and msg.body["value"]["text"] == f"ping {n}":
                return

    async def plain(n: int) -> None:
        direct.send_message(mto=slixmpp.JID("echo@chat.test"), mbody=f"ping {n}", mtype="chat")
        while await asyncio.wait_for(direct.lines.get(), TIMEOUT) != f"ping {n}":
            pass

    stub_rt = await timed_roundtrips(via_stub)
    direct_rt = await timed_roundtrips(plain)

    async def flow(send: Any) -> float:
        start = time.perf_counter()
        for n in range(XMPP_ONEWAY):
            send(n)
        for n in range(XMPP_ONEWAY):
            line = await asyncio.wait_for(sink.lines.get(), TIMEOUT)
            if line != f"line {n}":
                raise RuntimeError(f"out of order: {line!r} where line {n} was expected")
        return XMPP_ONEWAY / (time.perf_counter() - start)

    stub_flow = await flow(lambda n: app.post("xmpp://sink@chat.test", "create", {"value": {"text": f"line {n}"}}))
    direct_flow = await flow(
        lambda n: direct.send_message(mto=slixmpp.JID("sink@chat.test"), mbody=f"line {n}", mtype="chat")
    )
    for client in (echo, sink, direct):
        client.disconnect()
    p50, p99 = quantiles(stub_rt)
    d50, _ = quantiles(direct_rt)
    return {
        "xmpp_roundtrip_ms_p50": p50,
        "xmpp_roundtrip_ms_p99": p99,
        "xmpp_direct_roundtrip_ms_p50": d50,
        "xmpp_roundtrip_overhead": round(p50 / d50, 2),
        "xmpp_oneway_msgs_per_s": round(stub_flow),
        "xmpp_direct_oneway_msgs_per_s": round(direct_flow),
        "xmpp_oneway_overhead": round(stub_flow / direct_flow, 2),
    }


def mqtt_client(broker: Mosquitto, user: str, identifier: str) -> aiomqtt.Client:
    quiet = logging.getLogger("bench.mqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns at every publish beyond its threshold of pending ones
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        logger=quiet,
        username=user,
        password=f"{user}-pw",
        identifier=identifier,
        timeout=TIMEOUT,
        max_inflight_messages=1000,
        max_queued_incoming_messages=100_000,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],  # as the stub does: no Nagle delay
    )


async def bench_mqtt(runtime: Runtime, broker: Mosquitto) -> dict[str, Any]:
    app = Hyperty(runtime, "hyperty://a.test/bench-mqtt")
    await app.request("mqtt://iot.test/bench/pong", "subscribe")
    async with (
        mqtt_client(broker, "plain", "bench-echo") as echo,
        mqtt_client(broker, "plain", "bench-direct") as direct,
        mqtt_client(broker, "plain", "bench-sink") as sink,
    ):
        await echo.subscribe("bench/ping", qos=1)
        await direct.subscribe("bench/pong", qos=1)
        await sink.subscribe("bench/flow", qos=1)

        async def echoing() -> None:
            async for message in echo.messages:
                await echo.publish("bench/pong", message.payload, qos=1)

        echo_task = asyncio.ensure_future(echoing())
        direct_messages = aiter(direct.messages)
        sink_messages = aiter(sink.messages)

        async def via_stub(n: int) -> None:
            app.post("mqtt://iot.test/bench/ping", "update", {"value": n})
            while True:
                msg = await asyncio.wait_for(app.inbox.get(), TIMEOUT)
                if msg.type == "update" and msg.body["value"] == n:
                    return

        async def plain(n: int) -> None:
            await direct.publish("bench/ping", str(n), qos=1)
            while json.loads((await asyncio.wait_for(anext(direct_messages), TIMEOUT)).payload) != n:
                pass

        stub_rt = await timed_roundtrips(via_stub)
        direct_rt = await timed_roundtrips(plain)

        async def received() -> None:
            seen = 0
            while seen < MQTT_ONEWAY:
                await asyncio.wait_for(anext(sink_messages), TIMEOUT)
                seen += 1

        start = time.perf_counter()
        for n in range(MQTT_ONEWAY):
            app.post("mqtt://iot.test/bench/flow", "update", {"value": n})
        await received()
        stub_flow = MQTT_ONEWAY / (time.perf_counter() - start)
        start = time.perf_counter()
        publishing = asyncio.gather(*(direct.publish("bench/flow", str(n), qos=1) for n in range(MQTT_ONEWAY)))
        await received()
        await publishing
        direct_flow = MQTT_ONEWAY / (time.perf_counter() - start)
        echo_task.cancel()
    p50, p99 = quantiles(stub_rt)
    d50, _ = quantiles(direct_rt)
    return {
        "mqtt_roundtrip_ms_p50": p50,
        "mqtt_roundtrip_ms_p99": p99,
        "mqtt_direct_roundtrip_ms_p50": d50,
        "mqtt_roundtrip_overhead": round(p50 / d50, 2),
        "mqtt_oneway_msgs_per_s": round(stub_flow),
        "mqtt_direct_oneway_msgs_per_s": round(direct_flow),
        "mqtt_oneway_overhead": round(stub_flow / direct_flow, 2),
    }


async def main() -> dict[str, Any]:
    missing = missing_servers()
    if missing:
        return {"skipped": f"not installed: {', '.join(missing)}"}
    root = Path(tempfile.mkdtemp(prefix="protofly-bench-protocols-"))
    prosody, broker = Prosody(root / "prosody"), Mosquitto(root / "mosquitto")
    catalogues: list[CatalogueServer] = []
    try:
        for user in ("alice", "echo", "sink", "carol"):
            await prosody.register(user, f"{user}-pw")
        for user in ("alice", "plain"):
            await broker.add_user(user, f"{user}-pw")
        await asyncio.gather(prosody.start(), broker.start())
        trust = TrustStore()
        urls = {}
        for domain, stub, server in (("chat.test", "xmpp", prosody), ("iot.test", "mqtt", broker)):
            key = SigningKey.generate(domain)
            trust.add(domain, key.public_raw)
            package = root / domain / "package"
            shutil.copytree(ROOT / "stubs" / stub, package)
            template = json.loads((package / "descriptor.json").read_text())
            template["configuration"].update(server=server.endpoint, domain=domain)
            template["egress"] = [server.endpoint]
            (package / "descriptor.json").write_text(json.dumps(template))
            publish(package, root / domain / "catalogue", key, domain)
            catalogue = CatalogueServer(root / domain / "catalogue", default="default")
            await catalogue.start()
            catalogues.append(catalogue)
            urls[domain] = catalogue.base_url
        trust.save(root / "trust.json")
        (root / "credentials.json").write_text(json.dumps(CREDENTIALS))

        def config(n: int) -> RuntimeConfig:
            return RuntimeConfig(
                domain="a.test",
                state_dir=root / f"runtime-{n}",
                catalogues=urls,
                trust_store=root / "trust.json",
                allow_http_loopback=True,
                resolver_only=True,
                credentials_file=root / "credentials.json",
                **({"sandbox": os.environ["BENCH_SANDBOX"]} if os.environ.get("BENCH_SANDBOX") else {}),
            )

        figures: dict[str, Any] = {}
        for domain, prefix in (("chat.test", "xmpp"), ("iot.test", "mqtt")):
            samples = []
            for n in range(DEPLOYS):
                async with Runtime(config(n)) as runtime:
                    start = time.perf_counter()
                    await runtime.load_stub(domain)
                    samples.append((time.perf_counter() - start) * 1000)
            figures[f"{prefix}_cold_deploy_ms_p50"] = round(statistics.median(samples), 1)
        async with Runtime(config(DEPLOYS)) as runtime:
            await runtime.load_stub("chat.test")
            await runtime.load_stub("iot.test")
            figures |= await bench_xmpp(runtime, prosody)
            figures |= await bench_mqtt(runtime, broker)
        return figures
    finally:
        for catalogue in catalogues:
            await catalogue.stop()
        await asyncio.gather(prosody.stop(), broker.stop())
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
