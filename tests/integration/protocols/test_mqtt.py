"""The MQTT stub against a real Mosquitto: subscribe/publish both ways with a plain client, restarts, credentials."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiomqtt
from tests.integration.e2e.test_faults import kill_stub
from tests.integration.protocols.clients import LocalHyperty

from protofly.admin.server import AdminServer
from protofly.message import response_code
from protofly.supervision import Phase

RUNTIME = {"iot.test": {"username": "runtime", "password": "runtime-pw"}}


def plain(broker, user: str = "sensor", **options) -> aiomqtt.Client:
    """A plain MQTT client of the test broker, in the test process."""
    return aiomqtt.Client("127.0.0.1", broker.port, username=user, password=f"{user}-pw", timeout=5, **options)


async def test_subscribe_and_publish_both_ways_with_a_plain_client(mosquitto, catalogues, runtime_factory) -> None:
    await catalogues.publish("iot.test", "mqtt", {"server": mosquitto.endpoint})
    async with runtime_factory(credentials=RUNTIME) as runtime, plain(mosquitto) as sensor:
        app = LocalHyperty(runtime)
        answer = await app.request("mqtt://iot.test/sensors/+/temp", type="subscribe")
        assert response_code(answer) == 200, answer.body
        await sensor.publish("sensors/kitchen/temp", json.dumps({"celsius": 21.5}), qos=1)
        await sensor.publish("sensors/hall/temp", "cold", qos=1)
        await sensor.publish("sensors/hall/humidity", "ignored: no subscription matches", qos=1)
        updates = await app.wait(2)
        assert [(m.type, m.from_, m.body["value"]) for m in updates] == [
            ("update", "mqtt://iot.test/sensors/kitchen/temp", {"celsius": 21.5}),
            ("update", "mqtt://iot.test/sensors/hall/temp", "cold"),
        ]

        # hyperty → MQTT: state is retained (a late subscriber gets it), an event is not
        answer = await app.request("mqtt://iot.test/state/lamp", type="update", body={"value": {"on": True}})
        assert response_code(answer) == 200 and answer.body["value"] == {"topic": "state/lamp", "retained": True}
        answer = await app.request("mqtt://iot.test/events/door", type="create", body={"value": "opened"})
        assert response_code(answer) == 200 and answer.body["value"]["retained"] is False
        async with plain(mosquitto, "runtime", identifier="late-reader") as late:
            await late.subscribe("state/#", qos=1)
            message = await asyncio.wait_for(anext(aiter(late.messages)), 5)
            assert (message.topic.value, json.loads(message.payload), message.retain) == (
                "state/lamp",
                {"on": True},
                True,
            )

        # bad input gets a clear answer and changes nothing
        answer = await app.request("mqtt://iot.test/sensors/#", type="update", body={"value": 1})
        assert response_code(answer) == 400
        answer = await app.request("mqtt://iot.test/x", type="delete")
        assert response_code(answer) == 405


async def test_broker_restart_loses_no_accepted_publish(mosquitto, catalogues, runtime_factory) -> None:
    await catalogues.publish("iot.test", "mqtt", {"server": mosquitto.endpoint, "backoffBase": 0.2, "backoffCap": 0.5})
    async with runtime_factory(credentials=RUNTIME) as runtime:
        app = LocalHyperty(runtime)
        assert response_code(await app.request("mqtt://iot.test/sensors/#", type="subscribe")) == 200
        async with plain(mosquitto, "runtime", identifier="dashboard", clean_session=False) as dashboard:
            await dashboard.subscribe("out/#", qos=1)  # a persistent plain subscriber, offline from here on
        async with plain(mosquitto) as sensor:
            for n in range(20):
                await sensor.publish("sensors/count", str(n), qos=1)  # returns on PUBACK: accepted
        await mosquitto.stop()  # SIGTERM by pid: the broker saves its sessions
        # hyperty → MQTT while the broker is away: answered once the broker is back and acknowledges
        outgoing = [
            asyncio.ensure_future(app.request("mqtt://iot.test/out/n", type="update", body={"value": n}, timeout=20))
            for n in range(20)
        ]
        await mosquitto.start()
        # published at once, while the stub is still reconnecting: the stub's persistent session keeps them
        async with plain(mosquitto) as sensor:
            for n in range(20, 50):
                await sensor.publish("sensors/count", str(n), qos=1)
        async with asyncio.timeout(15):  # at least once: a redelivery may repeat a value, none may be missing
            while {m.body["value"] for m in app.inbox} != set(range(50)):
                await app.wait(len(app.inbox) + 1)
        answers = await asyncio.gather(*outgoing)
        assert [response_code(a) for a in answers] == [200] * 20
        seen: set[int] = set()
        async with plain(mosquitto, "runtime", identifier="dashboard", clean_session=False) as dashboard:
            async with asyncio.timeout(10):
                async for message in dashboard.messages:
                    seen.add(json.loads(message.payload))
                    if seen == set(range(20)):
                        break
        assert runtime.registry.stub("iot.test").status == "live"


async def test_a_refused_password_stops_until_new_credentials_from_the_cli(
    mosquitto, catalogues, runtime_factory, tmp_path
) -> None:
    await catalogues.publish("iot.test", "mqtt", {"server": mosquitto.endpoint})
    wrong = {"iot.test": {"username": "runtime", "password": "wrong"}}
    async with runtime_factory(credentials=wrong) as runtime:
        app = LocalHyperty(runtime)
        before = mosquitto.login_attempts()
        answer = await app.request("mqtt://iot.test/state/x", type="update", body={"value": 1})
        assert response_code(answer) == 401, answer.body
        assert runtime.phase("iot.test") is Phase.AUTH_FAILED
        for _ in range(5):
            assert response_code(await app.request("mqtt://iot.test/state/x", type="update", body={"value": 1})) == 401
        await asyncio.sleep(0.5)  # a retry loop would show up at the broker within this window
        assert mosquitto.login_attempts() - before == 1

        # the operator's way back: protofly stub credentials DOMAIN --file F --retry, over the admin socket
        admin = AdminServer(tmp_path / "admin.sock", max_request_size=runtime.config.max_message_size)
        await admin.claim()
        try:
            await admin.start(runtime)
            fixed = tmp_path / "fixed.json"
            fixed.write_text(json.dumps({"username": "runtime", "password": "runtime-pw"}))
            cli = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("protofly")),
                *("stub", "credentials", "iot.test", "--file", str(fixed), "--retry", "--admin", str(admin.path)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(cli.communicate(), 30)
            assert cli.returncode == 0, out.decode()
        finally:
            await admin.close()
        assert runtime.phase("iot.test") is Phase.LIVE
        answer = await app.request("mqtt://iot.test/state/x", type="update", body={"value": 2})
        assert response_code(answer) == 200, answer.body
        assert mosquitto.login_attempts() - before == 2


async def test_a_killed_stub_resumes_its_session_and_its_subscribers(mosquitto, catalogues, runtime_factory) -> None:
    """SIGKILL of the stub's sandbox: the runtime restarts it, the broker kept the session, the stub its hyperties."""
    await catalogues.publish("iot.test", "mqtt", {"server": mosquitto.endpoint})
    async with runtime_factory(credentials=RUNTIME) as runtime:
        app = LocalHyperty(runtime)
        assert response_code(await app.request("mqtt://iot.test/sensors/#", type="subscribe")) == 200
        record = runtime.registry.stub("iot.test")
        async with plain(mosquitto) as sensor:
            for n in range(10):
                await sensor.publish("sensors/count", str(n), qos=1)
            await app.wait(10)
            await kill_stub(record.info["pid"])
            for n in range(10, 30):  # while the runtime restarts the stub: queued at the broker for its session
                await sensor.publish("sensors/count", str(n), qos=1)
        async with asyncio.timeout(15):
            while {m.body["value"] for m in app.inbox} != set(range(30)):
                await app.wait(len(app.inbox) + 1)
        assert sum(1 for e in record.history if e.group == "connection" and e.value == "live") == 2
