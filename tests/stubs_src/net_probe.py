"""Test stub (hostile): tries to reach the network by itself and through the runtime, and reports each outcome.

A ``read`` message's body names what to try: ``tcp`` (host, port pairs to connect to directly), ``udp``
(host, port pairs to send a datagram to and wait for an answer), ``raw`` (open a raw ICMP socket),
``proc`` (files under /proc/net to read) and ``open`` (URLs to ask the runtime for with
``open_connection``; a socket it gets is used to send one line, so the test can see it arrive).
"""

import asyncio
import socket

from protofly.stub import Message, ProtoStub


def _outcome(exc):
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}{f' {code}' if code else ''}: {exc}"


async def _tcp(host, port):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 3)
    except (OSError, TimeoutError) as exc:
        return _outcome(exc)
    finally:
        sock.close()
    return "connected"


async def _udp(host, port):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        sock.send(b"datagram from a stub")
        await asyncio.wait_for(loop.sock_recv(sock, 100), 3)
    except (OSError, TimeoutError) as exc:
        return _outcome(exc)
    finally:
        sock.close()
    return "answered"


def _raw():
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError as exc:
        return _outcome(exc)
    sock.close()
    return "opened"


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError as exc:
        return _outcome(exc)


class NetProbe(ProtoStub):
    async def _open(self, url):
        try:
            sock = await self.open_connection(url)
        except OSError as exc:
            return _outcome(exc)
        try:
            _reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(f"hello from {self.url}\n".encode())
            await writer.drain()
            writer.close()
        except OSError as exc:
            return f"opened, then {_outcome(exc)}"
        return "opened"

    async def on_message(self, msg: Message) -> None:
        body = msg.body or {}
        results = {
            "tcp": [await _tcp(host, port) for host, port in body.get("tcp", [])],
            "udp": [await _udp(host, port) for host, port in body.get("udp", [])],
            "raw": _raw() if body.get("raw") else None,
            "proc": {path: _read(path) for path in body.get("proc", [])},
            "open": [await self._open(url) for url in body.get("open", [])],
        }
        answer = {"code": 200, "value": results}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=answer))
