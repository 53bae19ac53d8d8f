"""The XMPP stub against a real Prosody: chat both ways with a plain client, presence, restarts, credentials."""

from __future__ import annotations

from protofly.message import response_code

from .clients import LocalHyperty, PlainXmpp

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
