"""What acknowledged delivery and durable state cost the message node itself, without runtimes or stubs.

The node runs in its own process (``protofly msg-node serve``); two raw WebSocket clients in this process
play the two stubs of ``bench/restart.py``: A sends to an address B allocated, 100 B bodies packed
``PER_FRAME`` to a frame, B reads (and, with the extension, acknowledges each frame it read, as the stub
does).  Three set-ups, as in ``bench/restart.py``: ``plain`` (batching only), ``ack`` (acknowledged
delivery) and ``ack_durable`` (and ``--state-dir``, fsync every second).

* ``node_cpu_us_per_msg``: the node process's CPU time (``/proc/<pid>/stat``) per routed message, best of
  ``ROUNDS`` interleaved runs -- the node's own cost, whatever the clients cost, and far steadier on a
  shared machine than a rate through five processes;
* ``node_msgs_per_s``: the best rate of each set-up (the clients share a core with the node: indicative);
* ``ack_node_cost_us`` / ``durable_node_cost_us``: the difference to ``plain``, in µs per message.

Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

DOMAIN = "bench.test"
MESSAGES = 100_000
PER_FRAME = 500
#: Messages in flight from A to B: below the node's per-connection send queue (10,000).
WINDOW = 4_000
ROUNDS = 3
TICKS = os.sysconf("SC_CLK_TCK")
SETUPS = (("plain", False, False), ("ack", True, False), ("ack_durable", True, True))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def call(ws: aiohttp.ClientWebSocketResponse, msg: dict[str, Any]) -> dict[str, Any]:
    """Send ``msg`` and wait for its response (other frames before it are skipped)."""
    await ws.send_str(json.dumps(msg))
    while True:
        reply = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
        if isinstance(reply, dict) and reply.get("type") == "response" and reply.get("id") == msg["id"]:
            return reply


class Counter:
    """What B has received, and an event for A's window."""

    def __init__(self) -> None:
        self.received = 0
        self.progress = asyncio.Event()
        self.done = asyncio.Event()


async def read_b(ws: aiohttp.ClientWebSocketResponse, target: str, session: str, ack: bool, seen: Counter) -> None:
    """B's stub: count the messages for ``target``; with acks, acknowledge every frame read."""
    async for frame in ws:
        data = json.loads(frame.data)
        if isinstance(data, dict):
            count = 1 if data.get("to") == target else 0
        elif ack:
            groups = [data] if data and isinstance(data[0], int) else [g for g in data if isinstance(g, list)]
            count = sum(len(group) - 1 for group in groups)
            last = groups[-1][0] + len(groups[-1]) - 2
            ack_msg = {"type": "update", "from": session, "to": "mn:/session", "body": {"ack": last}}
            await ws.send_str(json.dumps(ack_msg))
        else:
            count = len(data)
        seen.received += count
        seen.progress.set()
        if seen.received >= MESSAGES:
            seen.done.set()
            return


async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:  # A's acks and answers: read so that the node never sees A as a slow consumer
        pass


async def one(name: str, ack: bool, durable: bool) -> tuple[float, float]:
    """One run: (node CPU µs per message, messages per second)."""
    state = Path(tempfile.mkdtemp(prefix="protofly-bench-acks-")) if durable else None
    extra = ["--state-dir", str(state)] if state is not None else []
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "protofly.cli", "msg-node", "serve", "--domain", DOMAIN, "--port", "0"),
        *("--ping-interval", "0", *extra),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    try:
        async with aiohttp.ClientSession() as http:
            a = await http.ws_connect(url, max_msg_size=0)
            b = await http.ws_connect(url, max_msg_size=0)
            body = {"batch": True, "ack": True} if ack else {"batch": True}
            await call(
                a, {"id": 1, "type": "open", "from": "hyperty-runtime://a.test/rt", "to": "mn:/session", "body": body}
            )
            opened = await call(
                b, {"id": 1, "type": "open", "from": "hyperty-runtime://b.test/rt", "to": "mn:/session", "body": body}
            )
            session = "hyperty-runtime://b.test/rt/" + opened["body"]["runtimeToken"]
            allocation = await call(
                b,
                {
                    "id": 2,
                    "type": "create",
                    "from": "hyperty-runtime://b.test/rt/registry",
                    "to": f"domain://msg-node.{DOMAIN}/address-allocation",
                    "body": {"scheme": "hyperty", "value": {"number": 1}},
                },
            )
            target = allocation["body"]["value"]["allocated"][0]
            pad = "x" * 80
            seen = Counter()
            readers = [asyncio.ensure_future(read_b(b, target, session, ack, seen)), asyncio.ensure_future(drain(a))]
            frames = []
            for first in range(0, MESSAGES, PER_FRAME):
                items = ",".join(
                    json.dumps(
                        {
                            "id": i,
                            "type": "update",
                            "from": "hyperty://a.test/x",
                            "to": target,
                            "body": {"seq": i, "pad": pad},
                        }
                    )
                    for i in range(first, first + PER_FRAME)
                )
                frames.append(f"[{first + 1},{items}]" if ack else f"[{items}]")
            before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            for index, frame in enumerate(frames):
                while index * PER_FRAME - seen.received > WINDOW:
                    seen.progress.clear()
                    await asyncio.wait_for(seen.progress.wait(), 30)
                await a.send_str(frame)
            await asyncio.wait_for(seen.done.wait(), 60)
            elapsed = time.perf_counter() - started
            used = cpu_seconds(proc.pid) - before
            for reader in readers:
                reader.cancel()
            await a.close()
            await b.close()
            return used / MESSAGES * 1e6, MESSAGES / elapsed
    finally:
        proc.terminate()
        await proc.wait()
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)


async def main() -> dict[str, Any]:
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in SETUPS}
    rate: dict[str, list[float]] = {name: [] for name, _, _ in SETUPS}
    for _ in range(ROUNDS):
        for name, ack, durable in SETUPS:
            used, per_s = await one(name, ack, durable)
            cpu[name].append(used)
            rate[name].append(per_s)
    best = {name: min(values) for name, values in cpu.items()}
    return {
        "node_cpu_us_per_msg": {name: round(value, 2) for name, value in best.items()},
        "node_msgs_per_s": {name: round(max(values)) for name, values in rate.items()},
        "ack_node_cost_us": round(best["ack"] - best["plain"], 2),
        "durable_node_cost_us": round(best["ack_durable"] - best["plain"], 2),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
