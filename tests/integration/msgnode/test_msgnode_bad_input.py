"""A real node over WebSocket: a text frame that is not UTF-8 gets a close frame (1007), and nothing else breaks."""

from __future__ import annotations

from tests.integration.msgnode.msgnode_helpers import WAIT


async def test_invalid_utf8_in_a_text_frame_is_closed_1007_and_the_node_serves_on(node, session):
    bad = await session(node, "a")
    good = await session(node, "b")
    [theirs] = await good.allocate()
    # bytes sent as a *text* frame: the node reads the frame's bytes itself and must answer, not crash
    await bad.ws.send(b'{"id":1,"type":"ping","from":"hyperty://b.test/\xff","to":"%s"}' % theirs.encode(), text=True)
    assert await bad.closed(WAIT) == 1007  # a close frame with a code: not 1006 (dropped without one)
    assert "UTF-8" in bad.ws.close_reason
    assert node.core.counters["invalid"] == 1

    # the node goes on: a ping (a type it gives no meaning to) is routed between two live sessions
    other = await session(node, "c")
    [mine] = await other.allocate()
    await other.send(id=5, type="ping", from_=mine, to=theirs, body={"n": 1})
    ping = await good.next(lambda m: m.get("type") == "ping")
    assert ping == {"id": 5, "type": "ping", "from": mine, "to": theirs, "body": {"n": 1}}
