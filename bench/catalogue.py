"""Catalogue benchmark: server throughput and the client's fetch+verify latency.

Prints one JSON object:

* ``descriptor_requests_per_s``: the catalogue server (its own process) answering
  ``GET /.well-known/protocolstub/echo`` (descriptor with the embedded source) to a load generator in
  another process: raw HTTP/1.1 keep-alive over 32 connections on 127.0.0.1, one request in flight per
  connection; best of 3 runs of 2 s.
* ``fetch_verify_ms_p50_cold``: ``CatalogueClient.fetch_stub`` with nothing cached (the entry is
  forgotten before each call; the connection pool is warm): one GET, parse, RFC 8785, Ed25519 verify,
  sha256, SQLite write.
* ``fetch_verify_ms_p50_cached``: the stub is cached and still fresh (the catalogue sent
  ``Cache-Control: max-age``): no network; checks the cached entry against today's policy and trust
  store.  This is what a redeploy or restart of a known stub costs.
* ``fetch_verify_ms_p50_revalidated``: cached but stale (``no-cache``): a conditional GET answered
  ``304``.  Dominated by the aiohttp client's round trip.
* ``fetch_verify_ms_p50_offline``: the catalogue is down: every candidate URL fails (connection
  refused) and the cached stub is used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "stubs" / "echo"
PATH = "/.well-known/protocolstub/echo"
CONNECTIONS = 32
LOAD_SECONDS = 2.0
SAMPLES = 300


# -- the server process -----------------------------------------------------------------------------------


async def serve(directory: Path, max_age: int) -> None:
    from protofly.catalogue.server import CatalogueServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with CatalogueServer(directory, default="echo", max_age=max_age) as server:
        print(server.port, flush=True)
        await stop.wait()


# -- the load generator process ---------------------------------------------------------------------------


class _Load(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, done: asyncio.Future[None], counts: list[int]) -> None:
        self.request, self.deadline, self.done, self.counts = request, deadline, done, counts
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            start = head.find(b"content-length:") + len(b"content-length:")
            length = int(head[start:].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            self.counts[0 if head.startswith(b"http/1.1 200") else 1] += 1
            self.buffer = self.buffer[end + 4 + length :]
            if time.perf_counter() < self.deadline:
                self.transport.write(self.request)  # type: ignore[attr-defined]
            else:
                self.transport.close()
                if not self.done.done():
                    self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def load(port: int, seconds: float, connections: int) -> None:
    loop = asyncio.get_running_loop()
    request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\r\n".encode()
    counts = [0, 0]
    started = time.perf_counter()
    deadline = started + seconds
    waits = []
    for _ in range(connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: _Load(request, deadline, d, counts), "127.0.0.1", port)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), seconds + 10)
    elapsed = time.perf_counter() - started
    print(json.dumps({"ok": counts[0], "errors": counts[1], "per_s": counts[0] / elapsed}), flush=True)


# -- orchestration ----------------------------------------------------------------------------------------


def start_server(directory: Path, max_age: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory), str(max_age)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise SystemExit(f"catalogue server did not start: {line!r}")
    return proc, int(line)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def requests_per_s(port: int) -> float:
    best = 0.0
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, __file__, "--load", str(port), str(LOAD_SECONDS), str(CONNECTIONS)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result = json.loads(done.stdout)
        if result["errors"]:
            raise SystemExit(f"load generator saw {result['errors']} non-200 responses")
        best = max(best, result["per_s"])
    return best


async def timed(fetch: object, samples: int, before: object = None) -> list[float]:
    out = []
    for _ in range(samples):
        if before is not None:
            await before()  # type: ignore[operator]
        start = time.perf_counter()
        await fetch()  # type: ignore[operator]
        out.append((time.perf_counter() - start) * 1000)
    return out


async def client_figures(base: Path, trust: object, port: int, fresh_port: int) -> dict[str, float]:
    from protofly.catalogue import CatalogueClient

    figures: dict[str, float] = {}
    common = {"home_domain": "a.test", "trust": trust, "allow_http_loopback": True, "resolver_only": True}
    resolver = {"b.test": f"http://127.0.0.1:{port}"}
    async with CatalogueClient(state_dir=base / "state-cold", resolver=resolver, **common) as client:

        async def fetch() -> object:
            stub = await client.fetch_stub("b.test")
            assert not stub.from_cache and stub.signer
            return stub

        async def forget() -> None:
            await client.forget("b.test")

        await timed(fetch, 20, forget)  # warm up imports, the connection pool and the disk
        figures["fetch_verify_ms_p50_cold"] = statistics.median(await timed(fetch, SAMPLES, forget))

        async def revalidate() -> object:
            stub = await client.fetch_stub("b.test")
            assert stub.revalidated
            return stub

        await client.fetch_stub("b.test")
        await timed(revalidate, 20)
        figures["fetch_verify_ms_p50_revalidated"] = statistics.median(await timed(revalidate, SAMPLES))

    fresh_resolver = {"b.test": f"http://127.0.0.1:{fresh_port}"}
    async with CatalogueClient(state_dir=base / "state-fresh", resolver=fresh_resolver, **common) as client:
        await client.fetch_stub("b.test")

        async def cached() -> object:
            stub = await client.fetch_stub("b.test")
            assert stub.from_cache and not stub.revalidated
            return stub

        await timed(cached, 50)
        figures["fetch_verify_ms_p50_cached"] = statistics.median(await timed(cached, SAMPLES))
    return figures


async def offline_figure(base: Path, trust: object, dead_port: int) -> float:
    from protofly.catalogue import CatalogueClient

    resolver = {"b.test": f"http://127.0.0.1:{dead_port}"}
    async with CatalogueClient(
        home_domain="a.test",
        state_dir=base / "state-cold",
        resolver=resolver,
        trust=trust,
        allow_http_loopback=True,
        resolver_only=True,
    ) as client:

        async def offline() -> object:
            stub = await client.fetch_stub("b.test")
            assert stub.offline
            return stub

        await timed(offline, 20)
        return statistics.median(await timed(offline, SAMPLES // 3))


def main() -> None:
    from protofly.catalogue import SigningKey, TrustStore, publish

    logging.getLogger("protofly").setLevel(logging.ERROR)  # the offline runs warn on every call, by design

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        key = SigningKey.generate("b.test")
        publish(ECHO, base / "pub", key, "b.test")
        trust = TrustStore({"b.test": [key.public_raw]})
        published = base / "pub" / ".well-known" / "protocolstub"
        descriptor_bytes = len((published / "echo.ps.json").read_bytes()) + len((published / "echo.ps.py").read_bytes())
        server, port = start_server(base / "pub", 0)
        fresh, fresh_port = start_server(base / "pub", 3600)
        try:
            rps = requests_per_s(port)
            figures = asyncio.run(client_figures(base, trust, port, fresh_port))
        finally:
            stop(fresh)
            stop(server)
        figures["fetch_verify_ms_p50_offline"] = asyncio.run(offline_figure(base, trust, port))
    result = {
        "descriptor_requests_per_s": round(rps),
        "fetch_verify_ms_p50_cold": round(figures["fetch_verify_ms_p50_cold"], 3),
        "fetch_verify_ms_p50_cached": round(figures["fetch_verify_ms_p50_cached"], 3),
        "fetch_verify_ms_p50_revalidated": round(figures["fetch_verify_ms_p50_revalidated"], 3),
        "fetch_verify_ms_p50_offline": round(figures["fetch_verify_ms_p50_offline"], 3),
        "stub_bytes": descriptor_bytes,
        "load_connections": CONNECTIONS,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(serve(Path(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        asyncio.run(load(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
    else:
        main()
