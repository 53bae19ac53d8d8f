"""Message node cluster figures: 1, 2 and 3 node processes on a three-server NATS cluster (JetStream, R3).

Everything runs on this machine: the NATS servers, the node processes (``protofly msg-node serve
--cluster``) and plain ``websockets`` clients in this process.  Hyperties are spread evenly over the nodes
and traffic crosses nodes (the sender of pair *i* is on node *i*, its receiver on node *i+1*; with one node,
both on it):

* one-way throughput: ``PAIRS`` pairs send ``MESSAGES`` 100 B messages in all, each keeping at most
  ``WINDOW`` in flight; every message is checked at its receiver (count and order);
* round trip (A -> B -> A across two nodes, sequential): p50 and p99;
* failover: a receiver on node 2 gets 500 msg/s from node 1; node 2 is killed with SIGKILL; the receiver
  does what the msgnode stub does (connect to the next node of its list, ``re-open``): the time from the
  kill to its session being live again, and how many of the messages sent were never delivered.

``node_cpu_us_per_msg``: the node processes' CPU time over the messages routed.  Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from protofly.msgnode.cluster.natsrun import NatsCluster
from protofly.msgnode.process import NodeProcess

DOMAIN = "bench.test"
SESSION = "mn:/session"
ALLOC = f"domain://msg-node.{DOMAIN}/address-allocation"
PAIRS = 6
MESSAGES = 30_000
WINDOW = 500
ROUNDTRIPS = 2_000


def cluster_node(name: str, cluster: str) -> NodeProcess:
    """One node of the domain's cluster, in its own process."""
    return NodeProcess(DOMAIN, "--ping-interval", "0", "--cluster", cluster, "--node-id", name, quiet=True)


class Peer:
    """A session with one hyperty address; incoming messages land in a queue."""

    def __init__(self, ws: ClientConnection, runtime: str) -> None:
        self.ws = ws
        self.runtime = runtime
        self.session = ""
        self.address = ""
        self.queue: asyncio.Queue[dict] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, runtime: str) -> Peer:
        ws = await connect(url, max_size=None, compression=None)
        peer = cls(ws, runtime)
        await ws.send(json.dumps({"id": 1, "type": "open", "from": runtime, "to": SESSION}))
        peer.session = f"{runtime}/{json.loads(await ws.recv())['body']['runtimeToken']}"
        await ws.send(json.dumps({"id": 2, "type": "create", "from": f"{runtime}/registry", "to": ALLOC, "body": {}}))
        peer.address = json.loads(await ws.recv())["body"]["value"]["allocated"][0]
        peer.reader = asyncio.create_task(peer._read())
        return peer

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                self.queue.put_nowait(json.loads(frame))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=2)


async def throughput(nodes: list[NodeProcess]) -> float:
    count = len(nodes)
    pairs = []
    for i in range(PAIRS):
        sender = await Peer.open(nodes[i % count].url, f"hyperty-runtime://s{i}.test/rt")
        receiver = await Peer.open(nodes[(i + 1) % count].url, f"hyperty-runtime://r{i}.test/rt")
        pairs.append((sender, receiver))
    await asyncio.sleep(0.3)  # the new addresses reach every node's cache
    per_pair = MESSAGES // PAIRS
    pad = "x" * 60

    async def run(sender: Peer, receiver: Peer) -> None:
        credit = asyncio.Semaphore(WINDOW)

        async def receive() -> None:
            for n in range(per_pair):
                msg = await asyncio.wait_for(receiver.queue.get(), timeout=30)
                assert msg["body"]["n"] == n, (msg, n)
                credit.release()

        task = asyncio.create_task(receive())
        for n in range(per_pair):
            await credit.acquire()
            head = f'{{"id":{n},"type":"update","from":"{sender.address}","to":"{receiver.address}"'
            frame = f'{head},"body":{{"n":{n},"p":"{pad}"}}}}'
            await sender.ws.send(frame)
        await task

    cpu = sum(node.cpu_seconds() for node in nodes)
    started = time.perf_counter()
    await asyncio.gather(*(run(s, r) for s, r in pairs))
    elapsed = time.perf_counter() - started
    cpu = sum(node.cpu_seconds() for node in nodes) - cpu
    for s, r in pairs:
        await s.close()
        await r.close()
    return MESSAGES / elapsed, cpu / MESSAGES * 1e6


async def roundtrip(nodes: list[NodeProcess]) -> tuple[float, float]:
    a = await Peer.open(nodes[0].url, "hyperty-runtime://rt-a.test/rt")
    b = await Peer.open(nodes[-1].url, "hyperty-runtime://rt-b.test/rt")
    await asyncio.sleep(0.3)
    samples = []
    for n in range(ROUNDTRIPS):
        started = time.perf_counter()
        await a.ws.send(json.dumps({"id": n, "type": "execute", "from": a.address, "to": b.address}))
        request = await asyncio.wait_for(b.queue.get(), timeout=10)
        await b.ws.send(json.dumps({"id": request["id"], "type": "response", "from": b.address, "to": a.address}))
        await asyncio.wait_for(a.queue.get(), timeout=10)
        samples.append((time.perf_counter() - started) * 1000)
    await a.close()
    await b.close()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


async def failover(nodes: list[NodeProcess]) -> dict[str, float]:
    sender = await Peer.open(nodes[0].url, "hyperty-runtime://fo-s.test/rt")
    receiver = await Peer.open(nodes[1].url, "hyperty-runtime://fo-r.test/rt")
    await asyncio.sleep(0.3)
    total = 3_000
    got: set[int] = set()

    async def send() -> None:
        for n in range(total):
            await sender.ws.send(
                json.dumps(
                    {"id": n, "type": "update", "from": sender.address, "to": receiver.address, "body": {"n": n}}
                )
            )
            await asyncio.sleep(0.002)

    traffic = asyncio.create_task(send())
    await asyncio.sleep(1.0)
    killed = time.perf_counter()
    nodes[1].kill()
    await nodes[1].stop()  # reaps it
    assert receiver.reader is not None
    await asyncio.wait_for(receiver.reader, timeout=10)  # the socket is gone
    while not receiver.queue.empty():
        got.add(receiver.queue.get_nowait()["body"]["n"])
    ws = await connect(nodes[2].url, max_size=None, compression=None)  # the stub's next node
    await ws.send(json.dumps({"id": 9, "type": "re-open", "from": receiver.session, "to": SESSION}))
    reply = json.loads(await ws.recv())
    live = (time.perf_counter() - killed) * 1000
    assert reply["body"]["code"] == 200, reply
    moved = Peer(ws, receiver.runtime)
    moved.reader = asyncio.create_task(moved._read())
    await traffic
    with contextlib.suppress(TimeoutError):
        while len(got) < total:
            got.add((await asyncio.wait_for(moved.queue.get(), timeout=5))["body"]["n"])
    await sender.close()
    await moved.close()
    return {"failover_live_ms": round(live, 1), "failover_sent": total, "failover_lost": total - len(got)}


async def main() -> None:
    out: dict[str, object] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        async with NatsCluster(Path(tmp) / "nats") as nats:
            for count in (1, 2, 3):
                nodes = [cluster_node(f"{count}n{i}", nats.url) for i in range(count)]
                await asyncio.gather(*(node.start() for node in nodes))
                try:
                    rate, cpu = await throughput(nodes)
                    p50, p99 = await roundtrip(nodes)
                finally:
                    await asyncio.gather(*(node.stop() for node in nodes))
                out[f"oneway_msgs_per_s_{count}_nodes"] = round(rate)
                out[f"node_cpu_us_per_msg_{count}_nodes"] = round(cpu, 1)
                out[f"roundtrip_ms_p50_{count}_nodes"] = round(p50, 3)
                out[f"roundtrip_ms_p99_{count}_nodes"] = round(p99, 3)
            nodes = [cluster_node(f"fo{i}", nats.url) for i in range(3)]
            await asyncio.gather(*(node.start() for node in nodes))
            try:
                out.update(await failover(nodes))
            finally:
                await asyncio.gather(*(node.stop() for node in nodes))
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
