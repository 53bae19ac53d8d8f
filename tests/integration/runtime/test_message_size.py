"""``max_message_size`` bounds what a stub may send, not only admin requests: over it, a message is refused."""

from __future__ import annotations

import pytest

from protofly.message import Message

LIMIT = 64 * 1024
INBOX = "hyperty://a.test/inbox"


def ask(size: int, how: str) -> Message:
    return Message(
        type="create",
        from_="hyperty://a.test/me",
        to="hyperty://b.test/x",
        body={"size": size, "how": how, "reply_to": INBOX},
    )


async def sent(runtime, inbox, size: int, how: str) -> list[dict]:
    """Ask the stub for ``size`` bytes of padding; return what reached the inbox before the stub's ``after``."""
    start = len(inbox)
    runtime.bus.post(ask(size, how))
    while True:
        received = (await inbox.wait_for(len(inbox) + 1, timeout=15))[start:]
        bodies = [{k: v for k, v in m.body.items() if k != "via"} for m in received]  # via: the runtime's stamp
        if {"after": size} in bodies:
            return bodies[: bodies.index({"after": size})]


@pytest.mark.parametrize(("sandbox", "how"), [("process", "sdk"), ("process", "raw"), ("in-process", "sdk")])
async def test_a_stub_message_over_max_message_size_is_refused_and_one_under_it_delivered(
    domains, runtime_factory, make_inbox, sandbox, how
) -> None:
    domains.publish("b.test", {}, stub="sizer")
    await domains.serve("b.test")
    async with runtime_factory(max_message_size=LIMIT, sandbox=sandbox) as runtime:
        inbox = make_inbox()
        runtime.bus.add_listener(INBOX, inbox)
        await runtime.load_stub("b.test")
        record = runtime.registry.stub("b.test")

        (under,) = await sent(runtime, inbox, LIMIT // 2, how)
        assert len(under["pad"]) == LIMIT // 2

        over = await sent(runtime, inbox, 2 * LIMIT, how)
        assert not any("pad" in body for body in over), "a message over max_message_size was delivered"
        if how == "sdk":  # refused on the stub's side of the channel: its post raised, naming the limit
            (refusal,) = over
            assert f"over the {LIMIT}-byte frame limit" in refusal["refused"]
        else:  # written past the SDK: the runtime's side of the channel dropped and counted it
            assert over == []
            assert record.counters["oversized_frames"] == 1
            assert record.summary()["counters"]["oversized_frames"] == 1
        assert record.status == "live"  # refusing a message does not cost the stub its life
