"""Acknowledged delivery on a real node: acks are cumulative and the journal is committed per loop turn.

A runtime's burst of numbered frames, read in one loop turn, is answered with one ``ack`` covering all of
it (not one per frame) and written to the journal in one ``write(2)`` -- and still every message is
routed, in order, and every one is in the journal before its ack left the node.
"""

from __future__ import annotations

import asyncio
import json

from tests.integration.msgnode.msgnode_helpers import SESSION, WAIT
from tests.polling import wait_until

from protofly.msgnode.core import MessageNodeCore
from protofly.msgnode.journal import Journal

FRAMES = 50


def is_ack(msg: dict) -> bool:
    return msg.get("from") == SESSION and msg.get("type") == "update" and "ack" in (msg.get("body") or {})


async def test_a_burst_of_numbered_frames_gets_one_cumulative_ack_and_one_journal_write(
    start_node, session, tmp_path
) -> None:
    node = await start_node(state_dir=tmp_path, fsync_interval=None)
    receiver = await session(node, "b", ack=True)
    [target] = await receiver.allocate(scheme="hyperty", value={"number": 1})
    sender = await session(node, "a", ack=True)
    journal = node.journal
    assert journal is not None
    writes = journal.writes

    for seq in range(1, FRAMES + 1):  # no await yields to the node in between: it reads them in one go
        message = {"id": seq, "type": "update", "from": "hyperty://a.test/x", "to": target, "body": {"n": seq}}
        await sender.ws.send(f"[{seq},{json.dumps(message)}]")

    last = await sender.next(lambda m: is_ack(m) and m["body"]["ack"] == FRAMES)
    acks = [m["body"]["ack"] for m in sender.inbox if is_ack(m)] + [last["body"]["ack"]]
    assert len(acks) < FRAMES / 10, acks  # cumulative: not one per frame
    assert acks == sorted(acks)
    assert journal.writes - writes < FRAMES / 10  # group commit: not one write per frame

    def bodies() -> list[int]:  # the client files a frame's elements: numbers, messages, [seq, message] pairs
        items = [m for item in receiver.inbox for m in (item[1:] if isinstance(item, list) else [item])]
        return [m["body"]["n"] for m in items if isinstance(m, dict) and "n" in (m.get("body") or {})]

    await wait_until(lambda: len(bodies()) >= FRAMES, timeout=WAIT)
    assert bodies() == list(range(1, FRAMES + 1))  # all routed, in order

    # everything acknowledged to the sender is on disk already (checkpoint + journal, as a restart reads them)
    snapshot, records = Journal(tmp_path).load()
    restored = MessageNodeCore(node.domain, journal=True)
    restored.restore(snapshot, now=0.0)
    restored.apply_journal(records)
    kept = restored.session(receiver.session_url)
    assert kept is not None and [json.loads(data)["body"]["n"] for _, data in kept.numbered()] == list(
        range(1, FRAMES + 1)
    )  # the receiver acknowledged none of them: all kept, numbered 1..50
    origin = restored.session(sender.session_url)
    assert origin is not None and origin.received == FRAMES


def numbered(seq: int, sender: str, to: str, n: int) -> str:
    return json.dumps([seq, {"id": n, "type": "update", "from": sender, "to": to, "body": {"n": n}}])


def carries(item: object, n: int) -> bool:
    """The client files a numbered frame's elements apart: the number, then the message."""
    return isinstance(item, dict) and (item.get("body") or {}).get("n") == n


async def test_an_ack_rides_with_the_reply_instead_of_going_alone(start_node, session) -> None:
    """Delayed acks on a real node: with a delay far beyond the test's waits, the ack for a's request can
    only reach a with the reply travelling to a -- one wake-up of a's process instead of two."""
    node = await start_node(ack_delay=60.0)
    a = await session(node, "a", ack=True)
    [a_addr] = await a.allocate(scheme="hyperty", value={"number": 1})
    b = await session(node, "b", ack=True)
    [b_addr] = await b.allocate(scheme="hyperty", value={"number": 1})

    await a.ws.send(numbered(1, a_addr, b_addr, 1))
    await b.next(lambda m: carries(m, 1))  # the request reached b
    assert not any(is_ack(m) for m in a.inbox if isinstance(m, dict))  # a has no ack yet: it waits
    await b.ws.send(numbered(1, b_addr, a_addr, 2))  # b's reply

    await a.next(lambda m: carries(m, 2))  # the reply ...
    ack = await a.next(lambda m: isinstance(m, dict) and is_ack(m))  # ... and, with it, the ack
    assert ack["body"]["ack"] == 1
    assert node.counters["acks_sent"] == 2  # one for a's frame, one for b's (b's still waits)


async def test_an_ack_goes_alone_after_the_delay(start_node, session) -> None:
    node = await start_node(ack_delay=0.05)
    receiver = await session(node, "b", ack=True)
    [target] = await receiver.allocate(scheme="hyperty", value={"number": 1})
    sender = await session(node, "a", ack=True)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    await sender.ws.send(numbered(1, "hyperty://a.test/x", target, 1))
    ack = await sender.next(lambda m: isinstance(m, dict) and is_ack(m))
    assert ack["body"]["ack"] == 1
    assert loop.time() - sent >= 0.04  # waited for data that never came, then went alone (no upper bound here)


async def test_with_no_delay_every_ack_goes_in_the_same_turn(start_node, session) -> None:
    node = await start_node(ack_delay=0)
    receiver = await session(node, "b", ack=True)
    [target] = await receiver.allocate(scheme="hyperty", value={"number": 1})
    sender = await session(node, "a", ack=True)
    frames_out = node.stats["frames_out"]
    await sender.ws.send(numbered(1, "hyperty://a.test/x", target, 1))
    ack = await sender.next(lambda m: isinstance(m, dict) and is_ack(m), timeout=WAIT)
    assert ack["body"]["ack"] == 1 and node.stats["frames_out"] - frames_out == 2  # the forward and the ack
