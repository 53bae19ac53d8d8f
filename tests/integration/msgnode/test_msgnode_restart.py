"""Lossless graceful restart on real sockets: drain handshake, state file, buffers of detached sessions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest
from tests.integration.msgnode.msgnode_helpers import DOMAIN, SESSION, SM, WAIT, Client, is_draining
from tests.polling import wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from protofly.msgnode import MessageNode, StateError

RESOURCE = "comm://a.test/room/changes"


async def drain_session(client, node: MessageNode, name: str, *, auto_drain: bool = True) -> Client:
    made = await client(node, auto_drain=auto_drain)
    reply = await made.open(f"hyperty-runtime://{name}.test/rt", drain=True)
    assert reply["body"]["code"] == 200 and reply["body"]["drain"] is True
    return made


def numbered(client: Client, to: str):
    return lambda m: m.get("to") == to and "n" in (m.get("body") or {})


# -- drain handshake ------------------------------------------------------------------------------------


async def test_everything_a_drain_client_sent_before_drained_is_routed(start_node, client):
    node = await start_node()
    sender = await drain_session(client, node, "a", auto_drain=False)
    receiver = await drain_session(client, node, "b")
    [target] = await receiver.allocate()
    sent = 0

    async def send_until_draining() -> None:
        nonlocal sent
        while not any(is_draining(m) for m in sender.inbox):
            await sender.send(id=sent, type="update", from_=sender.runtime, to=target, body={"n": sent})
            sent += 1
            if sent % 20 == 0:
                await asyncio.sleep(0)  # let the reader see 'draining'
        await sender.drained()  # the last frame: stop sending, as a drain stub keeps the rest in its outbox

    sending = asyncio.create_task(send_until_draining())
    await receiver.next(numbered(receiver, target))  # messages are flowing
    stop = asyncio.create_task(node.stop())  # ... while they flow
    await asyncio.wait_for(sending, WAIT)
    await asyncio.wait_for(stop, WAIT * 2)
    assert await sender.closed() == 1001 and await receiver.closed() == 1001
    got = [m["body"]["n"] for m in receiver.inbox if numbered(receiver, target)(m)]
    assert got == list(range(1, sent))  # all of them, in order (0 was taken above)
    counters = node.counters
    assert counters["drained"] == 2 and counters["drain_timeouts"] == 0 and counters["buffered"] == 0


async def test_plain_clients_are_closed_after_the_short_grace_and_their_messages_buffered(
    start_node, client, session, tmp_path
):
    node = await start_node(state_file=tmp_path / "state.json", drain_grace=0.05)
    plain = await session(node, "plain")
    [plain_address] = await plain.allocate()
    holder = await drain_session(client, node, "d", auto_drain=False)  # answers only when we say so
    stop = asyncio.create_task(node.stop())
    await holder.next(is_draining)
    assert await plain.closed() == 1001  # closed while a drain client is still being waited for
    assert not stop.done() and node.core.drain_pending == 1
    with pytest.raises(InvalidStatus) as refused:  # a draining node takes no new connection
        await asyncio.wait_for(connect(node.url, open_timeout=WAIT), WAIT)
    assert refused.value.response.status_code == 503
    await holder.send(id=1, type="update", from_=holder.runtime, to=plain_address, body={"n": 1})
    await holder.drained()
    await asyncio.wait_for(stop, WAIT)
    assert await holder.closed() == 1001
    state = json.loads((tmp_path / "state.json").read_text())
    [saved] = [s for s in state["sessions"] if s["runtimeURL"] == "hyperty-runtime://plain.test/rt"]
    assert [json.loads(b["data"])["body"] for b in saved["buffer"]] == [{"n": 1}]


async def test_a_drain_client_that_never_says_drained_is_closed_after_the_drain_timeout(start_node, client):
    node = await start_node(drain_timeout=0.3)
    silent = await drain_session(client, node, "silent", auto_drain=False)
    await asyncio.wait_for(node.stop(), WAIT)
    assert any(is_draining(m) for m in silent.inbox)
    assert await silent.closed() == 1001
    assert node.counters["drain_timeouts"] == 1


# -- restart with a state file ----------------------------------------------------------------------------


async def test_a_restarted_node_with_the_state_file_keeps_sessions_addresses_subscriptions(
    start_node, client, tmp_path
):
    state_file = tmp_path / "state.json"
    first = await start_node(state_file=state_file)
    a = await drain_session(client, first, "a")
    b = await drain_session(client, first, "b")
    [ha] = await a.allocate(value={"number": 1, "allocationKey": "mine"})
    [hb] = await b.allocate()
    reply = await b.request(type="subscribe", from_=f"{b.runtime}/sm", to=SM, body={"resources": [RESOURCE]})
    assert reply["body"]["code"] == 200
    await asyncio.wait_for(first.stop(), WAIT)
    assert await a.closed() == 1001 and await b.closed() == 1001
    assert state_file.exists()

    second = await start_node(port=first.port, state_file=state_file, session_grace=30.0)
    assert second.port == first.port and second.counters["sessions_restored"] == 2
    assert not state_file.exists() and state_file.with_name("state.json.loaded").exists()  # consumed
    a2 = await client(second, auto_drain=True)
    reply = await a2.reopen(a.session_url, drain=True)
    assert reply["body"] == {"code": 200, "runtimeToken": a.session_url.rsplit("/", 1)[1], "drain": True}
    # b has not re-opened yet: what a sends to it now waits, in order
    for n in range(10):
        await a2.send(id=n, type="update", from_=ha, to=hb, body={"n": n})
    await a2.send(id=10, type="update", from_=ha, to=RESOURCE, body={"n": 10})
    await wait_until(lambda: second.counters["buffered"] == 11)
    b2 = await client(second)
    await b2.send(id="reopen", type="re-open", from_=b.session_url, to=SESSION)
    first_frame = await b2.next()
    assert first_frame["id"] == "reopen" and first_frame["body"]["code"] == 200  # the 200 comes first
    got = [await b2.next() for _ in range(11)]
    assert [m["body"]["n"] for m in got] == list(range(11))
    assert [m["to"] for m in got] == [hb] * 10 + [RESOURCE]
    # and live routing both ways on the restored addresses
    await b2.send(id=20, type="update", from_=hb, to=ha, body={"n": 20})
    assert (await a2.next(numbered(a2, ha)))["body"]["n"] == 20


async def test_a_replay_bigger_than_the_send_queue_is_not_a_slow_consumer(start_node, client, session):
    """8 MB buffered for a reader that takes its time: it gets all of it, and what comes next, in order."""
    node = await start_node(send_queue=10, buffer_messages=1_000, buffer_bytes=32 << 20)
    sender = await session(node, "a")
    target = await session(node, "b")
    [hb] = await target.allocate()
    url = target.session_url
    await target.ws.close()
    await wait_until(lambda: node.core.session(url).conn is None)
    pad = "x" * 20_000
    for n in range(400):
        await sender.send(id=n, type="update", from_=sender.runtime, to=hb, body={"n": n, "pad": pad})
    await wait_until(lambda: node.counters["buffered"] == 400)
    again = await client(node, max_queue=4)
    again._reader.cancel()  # read nothing for now: the replay stays queued in the node
    await asyncio.gather(again._reader, return_exceptions=True)
    await again.ws.send(json.dumps({"id": "r", "type": "re-open", "from": url, "to": SESSION}))
    await wait_until(lambda: node.counters["replayed"] == 400)
    routed = node.counters["delivered"]
    await sender.send(id=400, type="update", from_=sender.runtime, to=hb, body={"n": 400})  # on top of the replay
    await wait_until(lambda: node.counters["delivered"] == routed + 1)
    assert node.counters["slow_consumers"] == 0
    frames = [json.loads(await asyncio.wait_for(again.ws.recv(), WAIT)) for _ in range(402)]
    assert frames[0]["id"] == "r" and frames[0]["body"]["code"] == 200
    assert [m["body"]["n"] for m in frames[1:]] == list(range(401))


async def test_a_full_buffer_is_a_503_naming_the_detached_session(start_node, session):
    node = await start_node(buffer_messages=2)
    sender = await session(node, "a")
    target = await session(node, "b")
    [hb] = await target.allocate()
    url = target.session_url
    await target.ws.close()
    await wait_until(lambda: node.core.session(url).conn is None)
    for n in range(2):
        await sender.send(id=n, type="update", from_=sender.runtime, to=hb, body={"n": n})
    reply = await sender.request(type="update", from_=sender.runtime, to=hb, body={"n": 2})
    assert reply["body"]["code"] == 503 and "buffer is full" in reply["body"]["description"]


# -- the state file's edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"format": "protofly-msgnode-state", "version": 1, "domain": "other.test", "sessions": []}', "domain"),
        (
            b'{"format": "protofly-msgnode-state", "version": 1, "domain": "b.test", "sessions": [{"token": "x"}]}',
            "sessions[0]",
        ),
    ],
)
async def test_a_corrupt_state_file_is_a_clear_error_at_start(tmp_path, content, words):
    state_file = tmp_path / "state.json"
    state_file.write_bytes(content)
    node = MessageNode(DOMAIN, state_file=state_file)
    with pytest.raises(StateError) as caught:
        await node.start()
    assert str(state_file) in str(caught.value) and words in str(caught.value)
    assert not node.running and state_file.read_bytes() == content  # left as found, for the operator


async def test_a_state_file_in_a_missing_directory_is_an_error(tmp_path):
    node = MessageNode(DOMAIN, state_file=tmp_path / "nowhere" / "state.json")
    with pytest.raises(StateError, match="directory does not exist"):
        await node.start()


async def test_a_state_file_that_does_not_exist_yet_starts_empty_and_is_written_at_stop(start_node, client, tmp_path):
    state_file = tmp_path / "state.json"
    node = await start_node(state_file=state_file)
    stub = await client(node)
    reply = await stub.reopen("hyperty-runtime://a.test/rt/old-token")
    assert reply["body"]["code"] == 404  # as without persistence: the stub falls back to open
    assert (await stub.open("hyperty-runtime://a.test/rt"))["body"]["code"] == 200
    await node.stop()
    saved = json.loads(state_file.read_text())
    assert [s["runtimeURL"] for s in saved["sessions"]] == ["hyperty-runtime://a.test/rt"]
    assert not list(tmp_path.glob(".state.json.*"))  # no temp file left behind


async def test_a_state_file_that_cannot_be_written_is_reported_at_stop(start_node, tmp_path):
    state_dir = tmp_path / "d"
    state_dir.mkdir()
    node = await start_node(state_file=state_dir / "state.json")
    (state_dir / "state.json").mkdir()  # the rename over a directory fails
    with pytest.raises(StateError, match="cannot write"):
        await node.stop()
    assert not node.running


# -- the real thing: two node processes, one port, one state file --------------------------------------------


async def _serve(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "protofly.cli",
        "msg-node",
        "serve",
        "--domain",
        DOMAIN,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
    return proc, line.decode().strip()


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout=10)


async def test_cli_restart_with_a_state_file_keeps_the_session(tmp_path, client):
    state_file = tmp_path / "state.json"
    first, url = await _serve("--port", "0", "--state-file", str(state_file), "--ping-interval", "0")
    try:
        assert url.startswith("ws://127.0.0.1:")
        stub = await client(url, auto_drain=True)
        assert (await stub.open("hyperty-runtime://a.test/rt", drain=True))["body"]["drain"] is True
        [address] = await stub.allocate()
    finally:
        assert await _stop(first) == 0
    assert await stub.closed() == 1001 and any(is_draining(m) for m in stub.inbox)
    port = url.rsplit(":", 1)[1].split("/")[0]
    second, again_url = await _serve("--port", port, "--state-file", str(state_file))
    try:
        assert again_url == url
        again = await client(url)
        assert (await again.reopen(stub.session_url))["body"]["code"] == 200
        peer = await client(url)
        await peer.open("hyperty-runtime://p.test/rt")
        await peer.send(id=1, type="update", from_="hyperty-runtime://p.test/rt", to=address, body={"n": 1})
        assert (await again.next(numbered(again, address)))["body"]["n"] == 1
    finally:
        assert await _stop(second) == 0


async def test_cli_refuses_a_corrupt_state_file(tmp_path):
    state_file = tmp_path / "state.json"
    state_file.write_text("garbage")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "protofly.cli",
        "msg-node",
        "serve",
        "--domain",
        DOMAIN,
        "--port",
        "0",
        "--state-file",
        str(state_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and out == b""
    assert b"not valid JSON" in err and str(state_file).encode() in err
