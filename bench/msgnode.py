"""Message node figures: the node runs in its own process, plain ``websockets`` clients drive it from this one.

* one-way throughput, client A -> node -> client B, 100 B and 10 kB bodies: every message is checked at B
  (order, and content: the node forwards the exact bytes, so B compares the text it got with what A sent);
  A keeps at most ``WINDOW`` messages in flight so the figure is the pipeline's rate, not a queue filling;
* request/response round trip (A -> B -> A), sequential, p50 and p99;
* fan-out of an update to 1,000 subscriber sessions (1,000 connections): time for one update to reach all
  of them (paced), then a burst of updates (deliveries/s), and how many deliveries were lost;
* each with and without the batching extension (``{"batch": true}`` at ``open``; arrays of messages);
* a graceful restart with a state file (``--state-file``): 200 drain-extension sessions, 50 of them
  detached with 200 buffered 1 kB messages each, one pair exchanging messages while the node stops:
  the stop (drain handshake + state write), the state file's size, the new node's start (loading it),
  every session's re-open, the replay rate of the buffered messages, and how many messages were lost.

``node_cpu_us_per_msg`` figures divide the node process's CPU time (``/proc/<pid>/stat``) by the messages
it routed: the node's own cost, whatever the clients cost.  Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from protofly.msgnode.process import NodeProcess

DOMAIN = "bench.test"
SESSION = "mn:/session"
ALLOC = f"domain://msg-node.{DOMAIN}/address-allocation"
SM = f"domain://msg-node.{DOMAIN}/sm"
#: Most messages (and bytes) A has in flight towards B: far below the node's per-connection queue limits.
WINDOW = 2_000
WINDOW_BYTES = 2 << 20
#: A batching client packs up to this many messages (and bytes) per frame.
BATCH = 64
BATCH_BYTES = 64 << 10
SEQ_PAD = '{"seq":,"pad":""}'  # a body is this plus the digits of seq plus the padding: exactly `size` bytes


# -- the node process -----------------------------------------------------------------------------------


def node_process(*options: str, port: int = 0) -> NodeProcess:
    return NodeProcess(DOMAIN, "--ping-interval", "0", *options, port=port)


# -- a stub-like client ---------------------------------------------------------------------------------


class Peer:
    """One session: ``ws``, the runtime URL and (after :meth:`allocate`) one hyperty address."""

    def __init__(self, ws: ClientConnection, runtime: str) -> None:
        self.ws = ws
        self.runtime = runtime
        self.address = ""

    @classmethod
    async def open(cls, url: str, name: str, *, batch: bool = False) -> Peer:
        ws = await connect(url, compression=None, max_size=None, max_queue=None, open_timeout=30)
        runtime = f"hyperty-runtime://{name}.test/rt"
        open_msg = {"id": 1, "type": "open", "from": runtime, "to": SESSION}
        if batch:
            open_msg["body"] = {"batch": True}
        await ws.send(json.dumps(open_msg))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert reply["body"]["code"] == 200, reply
        assert reply["body"].get("batch", False) is batch
        return cls(ws, runtime)

    async def allocate(self) -> str:
        await self.ws.send(
            json.dumps({"id": 2, "type": "create", "from": self.runtime, "to": ALLOC, "body": {"value": {"number": 1}}})
        )
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        self.address = reply["body"]["value"]["allocated"][0]
        return self.address

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), timeout=5)
        except TimeoutError:
            self.ws.transport.abort()


def unpack(data: str | bytes) -> list:
    obj = json.loads(data)
    return obj if isinstance(obj, list) else [obj]


# -- one-way throughput ----------------------------------------------------------------------------------


async def one_way(node: NodeProcess, size: int, count: int, batch: bool) -> dict:
    a = await Peer.open(node.url, f"a{size}{batch}", batch=batch)
    b = await Peer.open(node.url, f"b{size}{batch}", batch=batch)
    await a.allocate()
    await b.allocate()
    texts = [
        f'{{"id":{i},"type":"update","from":"{a.address}","to":"{b.address}",'
        f'"body":{{"seq":{i},"pad":"{"x" * (size - len(str(i)) - len(SEQ_PAD))}"}}}}'
        for i in range(count)
    ]
    received = 0
    errors = 0
    progress = asyncio.Event()

    async def receive() -> None:
        nonlocal received, errors
        while received < count:
            data = await b.ws.recv()
            if batch:
                for msg in unpack(data):
                    body = msg["body"]
                    errors += body["seq"] != received or len(body["pad"]) != size - len(str(received)) - len(SEQ_PAD)
                    received += 1
            else:
                errors += data != texts[received]
                received += 1
            progress.set()

    window = min(WINDOW, WINDOW_BYTES // size)
    cpu0 = node.cpu_seconds()
    start = time.perf_counter()
    reader = asyncio.create_task(receive())
    sent = 0
    while sent < count:
        while sent - received >= window:
            progress.clear()
            await asyncio.wait_for(progress.wait(), timeout=30)
        if batch:
            chunk = texts[sent : sent + max(1, min(BATCH, BATCH_BYTES // size))]
            await a.ws.send("[" + ",".join(chunk) + "]")
            sent += len(chunk)
        else:
            await a.ws.send(texts[sent])
            sent += 1
    await asyncio.wait_for(reader, timeout=60)
    elapsed = time.perf_counter() - start
    cpu = node.cpu_seconds() - cpu0
    await a.close()
    await b.close()
    label = f"one_way_{'100B' if size == 100 else '10kB'}{'_batch' if batch else ''}"
    return {
        f"{label}_msgs_per_s": round(count / elapsed),
        f"{label}_node_cpu_us_per_msg": round(cpu / count * 1e6, 2),
        f"{label}_errors": errors,
        f"{label}_frame_bytes": len(texts[0]),
    }


# -- round trip ------------------------------------------------------------------------------------------


async def round_trip(node: NodeProcess, count: int, batch: bool) -> dict:
    a = await Peer.open(node.url, f"rtta{batch}", batch=batch)
    b = await Peer.open(node.url, f"rttb{batch}", batch=batch)
    await a.allocate()
    await b.allocate()
    body = '{"pad":"' + "x" * 90 + '"}'

    async def responder() -> None:
        async for data in b.ws:
            for msg in unpack(data):
                await b.ws.send(
                    json.dumps(
                        {
                            "id": msg["id"],
                            "type": "response",
                            "from": b.address,
                            "to": msg["from"],
                            "body": {"code": 200},
                        }
                    )
                )

    task = asyncio.create_task(responder())
    samples = []
    for i in range(count + 100):
        request = f'{{"id":{i},"type":"read","from":"{a.address}","to":"{b.address}","body":{body}}}'
        start = time.perf_counter()
        await a.ws.send(request)
        reply = unpack(await asyncio.wait_for(a.ws.recv(), 10))[0]
        if i >= 100:  # warm-up excluded
            samples.append(time.perf_counter() - start)
        assert reply["id"] == i and reply["body"]["code"] == 200
    task.cancel()
    await a.close()
    await b.close()
    samples.sort()
    label = f"round_trip{'_batch' if batch else ''}"
    return {
        f"{label}_p50_ms": round(statistics.median(samples) * 1e3, 3),
        f"{label}_p99_ms": round(samples[int(len(samples) * 0.99)] * 1e3, 3),
    }


# -- fan-out ---------------------------------------------------------------------------------------------


async def fan_out(node: NodeProcess, subscribers: int, paced: int, burst: int, batch: bool) -> dict:
    resource = f"comm://{DOMAIN}/room-{batch}/changes"
    peers = []
    for start in range(0, subscribers, 100):  # connect in waves, not 1,000 handshakes at once
        peers += await asyncio.gather(
            *(Peer.open(node.url, f"s{i}{batch}", batch=batch) for i in range(start, min(start + 100, subscribers)))
        )
    for peer in peers:
        await peer.ws.send(
            json.dumps(
                {
                    "id": 3,
                    "type": "subscribe",
                    "from": f"{peer.runtime}/sm",
                    "to": SM,
                    "body": {"resources": [resource]},
                }
            )
        )
    for peer in peers:
        reply = unpack(await asyncio.wait_for(peer.ws.recv(), 30))[0]
        assert reply["body"]["code"] == 200, reply
    publisher = await Peer.open(node.url, f"pub{batch}", batch=batch)
    total = paced + burst
    counts = [0] * subscribers
    lost_order = 0
    everyone = asyncio.Event()
    done_for = [0] * total

    async def listen(index: int, peer: Peer) -> None:
        nonlocal lost_order
        while counts[index] < total:
            for msg in unpack(await peer.ws.recv()):
                n = msg["body"]["n"]
                lost_order += n != counts[index]
                counts[index] += 1
                done_for[n] += 1
                if done_for[n] == subscribers:
                    everyone.set()

    listeners = [asyncio.create_task(listen(i, p)) for i, p in enumerate(peers)]
    update = '{{"id":{n},"type":"update","from":"comm://bench.test/room","to":"' + resource + '","body":{{"n":{n}}}}}'
    per_update = []
    for n in range(paced):
        everyone.clear()
        start = time.perf_counter()
        await publisher.ws.send(update.format(n=n))
        await asyncio.wait_for(everyone.wait(), timeout=30)
        per_update.append(time.perf_counter() - start)
    cpu0 = node.cpu_seconds()
    start = time.perf_counter()
    for n in range(paced, total):
        await publisher.ws.send(update.format(n=n))
    _, pending = await asyncio.wait(listeners, timeout=30)
    elapsed = time.perf_counter() - start
    cpu = node.cpu_seconds() - cpu0
    for task in pending:
        task.cancel()
    lost = subscribers * total - sum(counts)
    await asyncio.gather(publisher.close(), *(p.close() for p in peers))
    label = f"fanout_{subscribers}{'_batch' if batch else ''}"
    return {
        f"{label}_update_p50_ms": round(statistics.median(per_update) * 1e3, 2),
        f"{label}_update_max_ms": round(max(per_update) * 1e3, 2),
        f"{label}_burst_deliveries_per_s": round(subscribers * burst / elapsed),
        f"{label}_node_cpu_us_per_delivery": round(cpu / (subscribers * burst) * 1e6, 2),
        f"{label}_lost": lost,
        f"{label}_out_of_order": lost_order,
    }


# -- graceful restart with a state file ---------------------------------------------------------------------


class DrainPeer:
    """A session with the drain extension: a reader files what arrives and answers ``draining`` at once."""

    def __init__(self, ws: ClientConnection, runtime: str) -> None:
        self.ws = ws
        self.runtime = runtime
        self.session_url = ""
        self.address = ""
        self.inbox: list[dict] = []
        self.draining = asyncio.Event()
        self.arrived = asyncio.Event()
        self.answer_draining = True
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, runtime: str) -> DrainPeer:
        ws = await connect(url, compression=None, max_size=None, max_queue=None, open_timeout=30)
        return cls(ws, runtime)

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for data in self.ws:
                for msg in unpack(data):
                    if msg.get("from") == SESSION and msg.get("body") == {"value": "draining"}:
                        self.draining.set()
                        if self.answer_draining:
                            await self.drained()
                    else:
                        self.inbox.append(msg)
                self.arrived.set()

    async def drained(self) -> None:
        await self.ws.send(
            json.dumps(
                {"id": 0, "type": "update", "from": self.session_url, "to": SESSION, "body": {"value": "drained"}}
            )
        )

    async def expect(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.inbox) < count:
                self.arrived.clear()
                await self.arrived.wait()

    async def request(self, msg: dict) -> dict:
        have = len(self.inbox)
        await self.ws.send(json.dumps(msg))
        await self.expect(have + 1)
        return self.inbox.pop(have)

    async def open(self, kind: str = "open") -> None:
        sender = self.runtime if kind == "open" else self.session_url
        reply = await self.request({"id": kind, "type": kind, "from": sender, "to": SESSION, "body": {"drain": True}})
        assert reply["body"]["code"] == 200 and reply["body"]["drain"] is True, reply
        self.session_url = f"{self.runtime}/{reply['body']['runtimeToken']}"

    async def close(self) -> None:
        self.reader.cancel()
        try:
            await asyncio.wait_for(self.ws.close(), timeout=5)
        except TimeoutError:
            self.ws.transport.abort()


async def restart(sessions: int = 200, detached: int = 50, per_session: int = 200, size: int = 1_000) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        state_file = Path(directory) / "state.json"
        started = time.perf_counter()
        node = node_process("--state-file", str(state_file))
        await node.start()
        start_empty = time.perf_counter() - started
        port = node.port
        peers = []
        try:
            for first in range(0, sessions, 50):
                peers += await asyncio.gather(
                    *(
                        DrainPeer.connect(node.url, f"hyperty-runtime://r{i}.test/rt")
                        for i in range(first, min(first + 50, sessions))
                    )
                )
            await asyncio.gather(*(peer.open() for peer in peers))
            for peer in peers:
                reply = await peer.request(
                    {"id": 2, "type": "create", "from": peer.runtime, "to": ALLOC, "body": {"value": {"number": 1}}}
                )
                peer.address = reply["body"]["value"]["allocated"][0]
            gone, live = peers[:detached], peers[detached:]
            for peer in gone:
                await peer.close()
            sender, receiver, flowing = live[0], live[1], live[2]
            pad = "x" * (size - 40)
            for n in range(per_session):
                for peer in gone:
                    await sender.ws.send(
                        json.dumps(
                            {
                                "id": n,
                                "type": "update",
                                "from": sender.address,
                                "to": peer.address,
                                "body": {"n": n, "pad": pad},
                            }
                        )
                    )
            buffered = 0
            for _ in range(300):
                buffered = (await node.stats())["buffered"]
                if buffered >= detached * per_session:
                    break
                await asyncio.sleep(0.05)

            flowing.answer_draining = False  # it sends until told, then says 'drained' itself
            sent = 0

            async def flow() -> None:
                nonlocal sent
                while not flowing.draining.is_set():
                    await flowing.ws.send(
                        json.dumps(
                            {
                                "id": sent,
                                "type": "update",
                                "from": flowing.address,
                                "to": receiver.address,
                                "body": {"n": sent},
                            }
                        )
                    )
                    sent += 1
                    if sent % 50 == 0:
                        await asyncio.sleep(0)
                await flowing.drained()

            flowing_task = asyncio.create_task(flow())
            await asyncio.sleep(0.2)
            stopping = time.perf_counter()
            await node.stop()
            stop_seconds = time.perf_counter() - stopping
            await asyncio.wait_for(flowing_task, 10)
            await asyncio.sleep(0.1)
            got = [m["body"]["n"] for m in receiver.inbox if m.get("to") == receiver.address]
            drain_lost = sent - len(got) + sum(1 for i, n in enumerate(got) if i != n)
            state_bytes = state_file.stat().st_size
            for peer in live:
                await peer.close()

            started = time.perf_counter()
            node = node_process("--state-file", str(state_file), port=port)
            await node.start()
            start_loaded = time.perf_counter() - started
            reopened = [
                DrainPeer(await connect(node.url, compression=None, max_size=None, max_queue=None), peer.runtime)
                for peer in peers
            ]
            for new, old in zip(reopened, peers, strict=True):
                new.session_url, new.address = old.session_url, old.address
            started = time.perf_counter()
            await asyncio.gather(*(peer.open("re-open") for peer in reopened))
            reopen_all = time.perf_counter() - started
            await asyncio.gather(*(peer.expect(per_session) for peer in reopened[:detached]))
            replay_seconds = time.perf_counter() - started
            replay_lost = sum(
                per_session - len(p.inbox) + sum(1 for i, m in enumerate(p.inbox) if m["body"]["n"] != i)
                for p in reopened[:detached]
            )
            await reopened[detached].ws.send(
                json.dumps(
                    {
                        "id": 9,
                        "type": "update",
                        "from": reopened[detached].address,
                        "to": reopened[0].address,
                        "body": {"n": per_session},
                    }
                )
            )
            await reopened[0].expect(per_session + 1)  # a restored address routes, live
            for peer in reopened:
                await peer.close()
        finally:
            await node.stop()
    return {
        "restart_sessions": sessions,
        "restart_buffered_messages": buffered,
        "restart_stop_ms": round(stop_seconds * 1e3, 1),
        "restart_state_bytes": state_bytes,
        "restart_start_empty_ms": round(start_empty * 1e3, 1),
        "restart_start_with_state_ms": round(start_loaded * 1e3, 1),
        "restart_reopen_all_ms": round(reopen_all * 1e3, 1),
        "restart_replay_msgs_per_s": round(detached * per_session / replay_seconds),
        "restart_drain_messages_in_flight": sent,
        "restart_drain_lost": drain_lost,
        "restart_replay_lost": replay_lost,
    }


async def main() -> dict:
    node = node_process()
    await node.start()
    results: dict = {}
    try:
        for batch in (False, True):
            results.update(await one_way(node, 100, 40_000, batch))
            results.update(await one_way(node, 10_000, 6_000, batch))
            results.update(await round_trip(node, 2_000, batch))
            results.update(await fan_out(node, 1_000, 10, 100, batch))
        stats = await node.stats()
        results["node_messages_out_per_write"] = round(stats["messages_out"] / max(stats["writes"], 1), 2)
        results["node_slow_consumers"] = stats["slow_consumers"]
    finally:
        await node.stop()
    results.update(await restart())
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
