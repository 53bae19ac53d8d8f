"""The node core on bad and unfamiliar input: any type routed, bad bytes answered with a close, never raised."""

from __future__ import annotations

import json

import pytest

from protofly.msgnode.actions import Close, CloseCode, Send
from protofly.msgnode.core import SESSION_URL, MessageNodeCore


class Conn:
    pass


def opened(core: MessageNodeCore, name: str, *, batch: bool = False) -> Conn:
    conn = Conn()
    core.connected(conn)
    body = {"batch": True} if batch else {}
    frame = {"id": 1, "type": "open", "from": f"hyperty-runtime://{name}.test/rt", "to": SESSION_URL, "body": body}
    [reply, *_] = core.received(conn, json.dumps(frame).encode())
    assert json.loads(reply.data)["body"]["code"] == 200
    return conn


def allocate(core: MessageNodeCore, conn: Conn) -> str:
    frame = {"id": 2, "type": "create", "from": "hyperty-runtime://x/rt/r", "to": core.allocation_url, "body": {}}
    [reply] = core.received(conn, json.dumps(frame).encode())
    return json.loads(reply.data)["body"]["value"]["allocated"][0]


@pytest.mark.parametrize("kind", ["ping", "pong", "PING", "x-vendor.event"])
def test_any_type_is_routed_as_the_exact_bytes_received(kind):
    core = MessageNodeCore("b.test")
    a, b = opened(core, "a"), opened(core, "b")
    here, there = allocate(core, a), allocate(core, b)
    raw = json.dumps({"id": 9, "type": kind, "from": here, "to": there, "body": {"n": 1}}).encode()
    [action] = core.received(a, raw)
    assert isinstance(action, Send) and action.conn is b and bytes(action.data) == raw
    assert core.counters["invalid"] == 0 and core.counters["errors_sent"] == 0


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize(
    "data",
    [
        b'{"id":1,"type":"ping","from":"hyperty://b.test/\xff","to":"hyperty://b.test/x"}',  # invalid UTF-8
        b'[{"id":1,"type":"ping","from":"hyperty://b.test/\xc3","to":"hyperty://b.test/x"}]',
        '{"id":1,"type":"ping","from":"hyperty://b.test/\ud800","to":"hyperty://b.test/x"}',  # lone surrogate
        b'{"id":1,"type":"ping","from":"a:b","to":"c:d","body":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["utf8", "utf8-batch", "surrogate", "deep"],
)
def test_a_frame_that_is_not_unicode_json_closes_1007_with_a_reason(data, batch):
    core = MessageNodeCore("b.test")
    conn = opened(core, "a", batch=batch)
    actions = core.received(conn, data)
    if isinstance(data, bytes) and data.startswith(b"[") and not batch:
        assert [(type(a), a.code) for a in actions] == [(Close, CloseCode.INVALID_DATA)]
        return
    [close] = actions
    assert isinstance(close, Close) and close.code == CloseCode.INVALID_DATA
    assert any(word in close.reason for word in ("UTF-8", "Unicode", "surrogate", "deep")), close.reason
    assert core.received(conn, b"{}") == [] and core.counters["ignored_after_close"] == 1
