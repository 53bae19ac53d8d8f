"""A small HTTP/1.1 server for prebuilt responses: the catalogue server's transport.

Why not aiohttp's server: the catalogue must answer every method it does not serve with ``405`` and an
``Allow`` header (aiohttp's C parser answers an unknown method ``400`` before any handler runs, and routes
``CONNECT host:port`` to ``404``), and it must not let half-sent requests hold connections open forever
(aiohttp has no timeout for reading a request head).  The catalogue only ever answers ``GET``/``HEAD`` with
bytes built in advance, so the protocol it needs is small enough to own:

* :func:`parse_head` is sans-I/O: the bytes of a request head in, a :class:`RequestHead` or a
  :class:`HeadError` (the status to answer: ``400``, ``414``, ``431``, ``501``, ``505``) out;
* :class:`HttpServer` is the asyncio shell: keep-alive, a body read and discarded (bounded) so the
  response is not lost to a reset, and three timeouts: ``idle_timeout`` (waiting for a request to
  start), ``header_timeout`` (from its first byte to the end of its head: a half-sent request is answered
  ``408`` and closed), ``send_timeout`` (a client that does not read its response).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote, urlsplit

import msgspec

from protofly.log import get_logger
from protofly.tasks import TaskSet

__all__ = ["HeadError", "HttpResponse", "HttpServer", "RequestHead", "body_length", "parse_head"]

_log = get_logger(__name__)

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")  # visible ASCII: anything else must be percent-encoded
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class HeadError(Exception):
    """A request head the server cannot accept: ``status`` is the answer, ``text`` says why."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head.  ``path`` is the decoded path of an origin- or absolute-form target, else
    None (``CONNECT``'s ``host:port``, ``OPTIONS *``); header names are lower case, repeats joined by ``,``."""

    method: str
    target: str
    path: str | None
    version: tuple[int, int]
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version >= (1, 1):
            return "close" not in connection
        return "keep-alive" in connection


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a handler answers; ``body`` is left out on the wire for ``HEAD`` and ``304``."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def parse_head(data: bytes, *, max_line_size: int, max_field_size: int, max_headers: int) -> RequestHead:
    """Parse a request head (request line and header fields, without the final blank line).

    Raises :class:`HeadError`: ``414`` for a request line over ``max_line_size`` bytes, ``431`` for a
    field line over ``max_field_size`` or more than ``max_headers`` fields, ``505`` for a version other
    than 1.x, ``400`` for anything malformed (a method that is not a token, obsolete line folding, a field
    name that is not a token or a value with control characters, conflicting ``Content-Length``).
    """
    lines = data.split(b"\r\n")
    line = lines[0]
    if len(line) > max_line_size:
        raise HeadError(414, f"request line of {len(line)} bytes is over the {max_line_size}-byte limit")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise HeadError(400, "request line: expected 'METHOD target HTTP/1.1'")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HeadError(400, "request line: the method is not a token")
    if not _TARGET.match(target):
        raise HeadError(400, "request line: the target holds characters that must be percent-encoded")
    matched = _VERSION.match(version)
    if matched is None:
        raise HeadError(400, "request line: no HTTP version")
    major, minor = int(matched[1]), int(matched[2])
    if major != 1:
        raise HeadError(505, f"HTTP/{major}.{minor} is not supported; use HTTP/1.1")
    fields = lines[1:]
    if len(fields) > max_headers:
        raise HeadError(431, f"{len(fields)} header fields; at most {max_headers} are accepted")
    headers: dict[str, str] = {}
    for raw in fields:
        if len(raw) > max_field_size:
            raise HeadError(431, f"a header field of {len(raw)} bytes is over the {max_field_size}-byte limit")
        if raw[:1] in (b" ", b"\t"):
            raise HeadError(400, "header: obsolete line folding is not accepted")
        name, colon, value = raw.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HeadError(400, "header: a field name is not a token")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise HeadError(400, f"header {name.decode('ascii')}: control characters in the value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in ("content-length", "host") and headers[key] != text:
                raise HeadError(400, f"header {key}: given twice with different values")
            if key not in ("content-length", "host"):
                headers[key] = f"{headers[key]}, {text}"
            continue
        headers[key] = text
    target_text = target.decode("latin-1")
    return RequestHead(method.decode("ascii"), target_text, _path(target_text), (major, minor), headers)


def _path(target: str) -> str | None:
    if target.startswith("/"):
        return unquote(target.split("?", 1)[0].split("#", 1)[0])
    if target.startswith(("http://", "https://")):
        return unquote(urlsplit(target).path or "/")
    return None  # authority form (CONNECT) or asterisk form (OPTIONS *)


def body_length(head: RequestHead) -> int | None:
    """Bytes of request body to read and discard; None when the framing cannot be read (chunked, bad)."""
    if "transfer-encoding" in head.headers:
        return None
    raw = head.headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise HeadError(400, "header content-length: not a number")
    return int(raw)


Handler = Callable[[RequestHead], HttpResponse]


class HttpServer:
    """Serves ``handler`` over HTTP/1.1 (TLS when ``ssl_context`` is given) on ``host:port``.

    ``on_error(status)`` is told about every answer the server makes by itself (a bad head, a timeout), so
    the owner can count them next to the handler's.
    """

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_line_size: int = 4096,
        max_field_size: int = 4096,
        max_headers: int = 64,
        max_body: int = 64 << 10,
        header_timeout: float = 10.0,
        idle_timeout: float = 75.0,
        send_timeout: float = 30.0,
        backlog: int = 1024,
        on_error: Callable[[int], None] = lambda status: None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.backlog = backlog
        self.on_error = on_error
        #: Open connections (a test awaits this going down; a leak detector watches it).
        self.connections = 0
        self._limit = max_line_size + max_headers * (max_field_size + 2) + 4
        self._server: asyncio.Server | None = None
        self._tasks = TaskSet("catalogue-http")
        self._date = ("", 0)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept,
            self.host,
            self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.header_timeout if self.ssl_context else None,
            backlog=self.backlog,
            limit=self._limit,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection (requests in flight are cut) and wait at most ``timeout``."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await self._tasks.close(timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self._tasks.spawn(self._serve(reader, writer), name="catalogue-connection")
        except RuntimeError:  # closing: no new connection
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away or stopped reading: nothing to answer
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True when the connection stays open for the next."""
        started = False
        try:
            async with asyncio.timeout(self.idle_timeout) as deadline:  # one timer, moved once data arrives
                first = await reader.read(1)
                if not first:
                    return False
                started = True
                deadline.reschedule(asyncio.get_running_loop().time() + self.header_timeout)
                data = first + await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            if started:
                text = f"request head not complete within {self.header_timeout:g} s"
                await self._refuse(writer, HeadError(408, text))
            return False  # an idle keep-alive connection is closed without a word
        except asyncio.LimitOverrunError:
            await self._refuse(writer, HeadError(431, f"request head over the {self._limit}-byte limit"))
            return False
        except asyncio.IncompleteReadError:
            return False  # the client closed mid-head
        try:
            head = parse_head(
                data[:-4],
                max_line_size=self.max_line_size,
                max_field_size=self.max_field_size,
                max_headers=self.max_headers,
            )
            length = body_length(head)
        except HeadError as exc:
            await self._refuse(writer, exc)
            return False
        keep = head.keep_alive
        if length is None or length > self.max_body:
            keep = False  # cannot (or will not) read the body: answer, then close
        elif length:
            async with asyncio.timeout(self.header_timeout):
                await reader.readexactly(length)
        response = self.handler(head)
        await self._write(writer, response, head.method == "HEAD", keep)
        return keep

    async def _refuse(self, writer: asyncio.StreamWriter, error: HeadError) -> None:
        self.on_error(error.status)
        reason = _REASONS[error.status].lower()
        body = msgspec.json.encode({"code": error.status, "error": reason, "description": error.text})
        response = HttpResponse(error.status, body, {"Content-Type": "application/json"})
        await self._write(writer, response, False, False)

    async def _write(self, writer: asyncio.StreamWriter, response: HttpResponse, head_only: bool, keep: bool) -> None:
        status = response.status
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Date: {self._now()}"]
        lines += [f"{name}: {value}" for name, value in response.headers.items()]
        if status != 304:
            lines.append(f"Content-Length: {len(response.body)}")
        if not keep:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if head_only or status == 304 else head + response.body)
        if writer.transport.get_write_buffer_size():  # only a client that does not read makes this wait
            async with asyncio.timeout(self.send_timeout):
                await writer.drain()

    def _now(self) -> str:
        second = int(time.time())
        text, cached = self._date
        if cached != second:
            text = formatdate(second, usegmt=True)
            self._date = (text, second)
        return text
