"""Message bus figures: local delivery, delivery through the registry's resolver, request round trips, decoding.

Prints one JSON object.  Each figure is the best of a few runs (the least disturbed by the machine).
"""

from __future__ import annotations

import asyncio
import json
import time

from protofly.bus import MessageBus
from protofly.message import Message, decode, encode, response
from protofly.registry import RuntimeRegistry

N = 300_000
ROUNDS = 3


def best_rate(count: int, run) -> float:
    rates = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def delivery_rate(bus: MessageBus, msgs: list[Message], seen: list[int]) -> float:
    """Post ``msgs`` N times over; ``seen`` is the listener's counter, checked so no delivery is skipped."""
    post = bus.post

    def run() -> None:
        for _ in range(N // len(msgs)):
            for m in msgs:
                post(m)

    rate = best_rate(N, run)
    assert seen[0] == N * ROUNDS
    return rate


def counting(seen: list[int]):
    def listener(m: Message) -> None:
        seen[0] += 1

    return listener


def local_deliveries() -> float:
    bus = MessageBus()
    seen = [0]
    bus.add_listener("hyperty://a.test/dst", counting(seen))
    msgs = [
        Message(id=i, type="update", from_="hyperty://a.test/src", to="hyperty://a.test/dst", body={"n": i})
        for i in range(1000)
    ]
    return delivery_rate(bus, msgs, seen)


async def resolved_deliveries() -> float:
    bus = MessageBus()
    registry = await RuntimeRegistry.open(bus, domain="a.test")
    bus.set_resolver(registry.resolve)
    record = registry.register_stub("b.test")
    seen = [0]
    bus.add_listener(record.url, counting(seen))
    msgs = [
        Message(id=i, type="update", from_="hyperty://a.test/src", to=f"hyperty://b.test/{i % 50}", body={})
        for i in range(1000)
    ]
    return delivery_rate(bus, msgs, seen)


async def request_roundtrips(concurrency: int, total: int) -> float:
    bus = MessageBus()
    post = bus.post
    bus.add_listener("hyperty://a.test/svc", lambda m: post(response(m, 200)))

    async def worker(sender: str, count: int) -> None:
        request = bus.request
        for _ in range(count):
            await request(Message(type="read", from_=sender, to="hyperty://a.test/svc"), 5.0)

    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        await asyncio.gather(*(worker(f"hyperty://a.test/c{i}", total // concurrency) for i in range(concurrency)))
        best = max(best, total / (time.perf_counter() - start))
    assert bus.pending_requests == 0
    return best


def decode_validate() -> float:
    raw = encode(
        Message(
            id=1,
            type="update",
            from_="hyperty://a.test/1",
            to="hyperty://b.test/2",
            body={"value": {"text": "x" * 80}, "via": "hyperty-runtime://a.test/rt/protostub/1"},
        )
    )

    def run() -> None:
        for _ in range(N):
            decode(raw)

    return best_rate(N, run)


async def main() -> None:
    figures = {
        "local_deliveries_per_s": round(local_deliveries()),
        "resolved_deliveries_per_s": round(await resolved_deliveries()),
        "request_roundtrips_per_s": round(await request_roundtrips(64, 128_000)),
        "request_roundtrips_per_s_sequential": round(await request_roundtrips(1, 50_000)),
        "decode_validate_per_s": round(decode_validate()),
        "message_bytes": len(
            encode(
                Message(
                    id=1,
                    type="update",
                    from_="hyperty://a.test/1",
                    to="hyperty://b.test/2",
                    body={"value": {"text": "x" * 80}, "via": "hyperty-runtime://a.test/rt/protostub/1"},
                )
            )
        ),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
