"""A consumer that stops reading while 60,000 x 1 kB messages are sent to it: no message vanishes.

Every message the sender posts is accounted for: either its receiver gets it (after re-opening its session
on a fresh connection) or the sender is answered ``503``.  Counted, on real sockets, against a real node.
"""

from __future__ import annotations

import json

from tests.integration.msgnode.msgnode_helpers import SESSION, WAIT, Client
from tests.polling import wait_until
from websockets.asyncio.client import connect

TOTAL = 60_000
PAD = "x" * 900  # about 1 kB per message


async def test_a_consumer_that_stops_reading_loses_nothing_silently(node, client) -> None:
    # the receiver: an ack session whose socket is read only for the handshake, then never again
    stalled = await connect(node.url, max_queue=4, open_timeout=WAIT)
    runtime = "hyperty-runtime://slow.test/rt"
    await stalled.send(json.dumps({"id": 1, "type": "open", "from": runtime, "to": SESSION, "body": {"ack": True}}))
    token = json.loads(await stalled.recv())["body"]["runtimeToken"]
    session_url = f"{runtime}/{token}"
    target = f"{runtime}/inbox"  # below the runtime URL: routed to this session

    sender = await client(node)
    await sender.open("hyperty-runtime://fast.test/rt", batch=True)
    me = f"{sender.runtime}/h"
    batch: list[dict] = []
    for n in range(TOTAL):
        batch.append({"id": n + 1, "type": "update", "from": me, "to": target, "body": {"n": n, "pad": PAD}})
        if len(batch) == 200:
            await sender.ws.send(json.dumps(batch))
            batch = []

    def refused() -> list[int]:
        return [m["id"] - 1 for m in sender.inbox if m.get("type") == "response" and m["body"]["code"] == 503]

    await wait_until(lambda: node.counters["messages_in"] >= TOTAL + 1, timeout=15)  # + the sender's open
    await wait_until(lambda: len(refused()) + node.core.session(session_url).sent == TOTAL, timeout=10)

    # the receiver comes back on a new connection and takes everything the node kept for it
    reader: Client = await client(node)
    reply = await reader.reopen(session_url, ack=True, received=0)
    assert reply["body"]["code"] == 200
    kept = node.core.session(session_url).sent
    got: set[int] = set()

    def numbered_arrived() -> bool:
        while reader.inbox:  # the client's reader unpacks each numbered frame [seq, message] into the inbox
            item = reader.inbox.pop()
            if isinstance(item, dict) and "n" in (item.get("body") or {}):
                got.add(item["body"]["n"])
        return len(got) == kept

    await wait_until(numbered_arrived, timeout=15)
    stalled.transport.abort()

    answered = set(refused())
    assert answered and got  # both happened: some kept, the rest refused
    assert answered.isdisjoint(got) and answered | got == set(range(TOTAL))  # 0 silent drops
    counters = node.counters
    assert counters["buffer_full"] == len(answered)
