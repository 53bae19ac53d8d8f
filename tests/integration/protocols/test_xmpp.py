"""The XMPP stub against a real Prosody: chat both ways with a plain client, presence, restarts, credentials."""

from __future__ import annotations

import asyncio

from tests.integration.protocols.clients import LocalHyperty, PlainXmpp

from protofly.message import response_code
from protofly.supervision import Phase

ALICE = {"chat.test": {"jid": "alice@chat.test", "password": "alice-pw"}}


async def test_chat_both_ways_with_a_plain_xmpp_client(prosody, catalogues, runtime_factory) -> None:
    await catalogues.publish("chat.test", "xmpp", {"server": prosody.endpoint})
    bob = PlainXmpp("bob@chat.test", "bob-pw", prosody.port, echo=True)
    await bob.start()
    try:
        async with runtime_factory(credentials=ALICE) as runtime:
            app = LocalHyperty(runtime)
            answer = await app.request("xmpp://bob@chat.test", body={"value": {"text": "hello bob"}})
            assert response_code(answer) == 200, answer.body
            # reTHINK's user form names the same XMPP user
            answer = await app.request("user://chat.test/bob", body={"value": {"text": "second line"}})
            assert response_code(answer) == 200, answer.body
            await bob.wait_lines(2)
            assert bob.lines == [("alice@chat.test", "hello bob"), ("alice@chat.test", "second line")]
            inbox = await app.wait(2)
            assert [(m.type, m.from_, m.body["value"]["text"]) for m in inbox] == [
                ("create", "xmpp://bob@chat.test", "re: hello bob"),
                ("create", "xmpp://bob@chat.test", "re: second line"),
            ]
            assert runtime.registry.stub("chat.test").status == "live"
    finally:
        await bob.stop()


async def test_presence_is_a_resource_and_follows_the_contact(prosody, catalogues, runtime_factory) -> None:
    await catalogues.publish("chat.test", "xmpp", {"server": prosody.endpoint})
    async with runtime_factory(credentials=ALICE) as runtime:
        app = LocalHyperty(runtime)
        answer = await app.request("xmpp://chat.test/presence", type="subscribe")
        assert response_code(answer) == 200, answer.body
        assert answer.body["value"] == {"presence": {}}
        bob = PlainXmpp("bob@chat.test", "bob-pw", prosody.port)
        await bob.start()
        bob.send_presence_subscription(pto="alice@chat.test")  # the stub's account accepts and subscribes back
        while not any(m.body["value"]["available"] is True for m in app.inbox):
            await app.wait(len(app.inbox) + 1)
        assert {m.from_ for m in app.inbox} == {"xmpp://chat.test/presence"}
        assert {m.body["value"]["jid"] for m in app.inbox} == {"bob@chat.test"}
        await bob.stop()
        while not any(m.body["value"]["available"] is False for m in app.inbox):
            await app.wait(len(app.inbox) + 1)
        # the stub's own presence is its status: online while the runtime's account is
        assert runtime.registry.stub("chat.test").status == "live"
        assert ("alice@chat.test", "available") in bob.presence


async def test_server_restart_mid_stream_loses_no_accepted_line(prosody, catalogues, runtime_factory) -> None:
    await catalogues.publish("chat.test", "xmpp", {"server": prosody.endpoint, "backoffBase": 0.05, "backoffCap": 0.2})
    bob = PlainXmpp("bob@chat.test", "bob-pw", prosody.port)
    await bob.start()
    bob_again: PlainXmpp | None = None
    try:
        async with runtime_factory(credentials=ALICE) as runtime:
            app = LocalHyperty(runtime)
            answer = await app.request("xmpp://bob@chat.test", body={"value": {"text": "line 0"}})
            assert response_code(answer) == 200
            pending = [
                asyncio.ensure_future(
                    app.request("xmpp://bob@chat.test", body={"value": {"text": f"line {n}"}}, timeout=15)
                )
                for n in range(1, 60)
            ]
            await prosody.stop(kill=True)  # SIGKILL by pid, mid-stream
            await prosody.start()
            answers = await asyncio.gather(*pending)
            accepted = {"line 0"} | {
                f"line {n}" for n, a in zip(range(1, 60), answers, strict=True) if response_code(a) == 200
            }
            assert len(accepted) == 60, [a.body for a in answers if response_code(a) != 200][:3]
            bob_again = PlainXmpp("bob@chat.test", "bob-pw", prosody.port)
            await bob_again.start()  # lines accepted while bob was offline come from the server's offline store
            received = {text for _, text in bob.lines}
            async with asyncio.timeout(10):
                while not accepted <= received | {text for _, text in bob_again.lines}:
                    bob_again.changed.clear()
                    await bob_again.changed.wait()
            assert runtime.registry.stub("chat.test").status == "live"
    finally:
        if bob_again is not None:
            await bob_again.stop()


async def test_a_refused_password_stops_until_new_credentials(prosody, catalogues, runtime_factory) -> None:
    await catalogues.publish("chat.test", "xmpp", {"server": prosody.endpoint})
    wrong = {"chat.test": {"jid": "alice@chat.test", "password": "not-alice-pw"}}
    async with runtime_factory(credentials=wrong) as runtime:
        app = LocalHyperty(runtime)
        before = prosody.login_attempts()
        answer = await app.request("xmpp://bob@chat.test", body={"value": {"text": "hi"}})
        assert response_code(answer) == 401, answer.body
        assert runtime.phase("chat.test") is Phase.AUTH_FAILED
        assert runtime.registry.stub("chat.test").summary()["cause"] == "auth"
        for _ in range(5):
            answer = await app.request("xmpp://bob@chat.test", body={"value": {"text": "again"}})
            assert response_code(answer) == 401
        await asyncio.sleep(0.5)  # a retry loop would show up at the server within this window
        assert prosody.login_attempts() - before == 1  # one login, refused; no retry storm

        runtime.set_credentials("chat.test", {"jid": "alice@chat.test", "password": "alice-pw"})
        handle = await runtime.retry_now("chat.test")
        assert handle.status == "live"
        answer = await app.request("xmpp://bob@chat.test", body={"value": {"text": "now with the right password"}})
        assert response_code(answer) == 200, answer.body
        assert prosody.login_attempts() - before == 2
