"""The runtime's admin API: JSON over HTTP on a unix socket, and the client the CLI uses to reach it.

``protofly runtime serve`` holds one long-running :class:`~protofly.runtime.Runtime`; every other command
(``stub deploy``, ``stub list``, ``send``, ...) is a short-lived client of that process.  A unix socket and
not a TCP port because the admin API can load code and send messages in the runtime's name: the socket is
created mode 0600 in the runtime's state directory, so file permissions are the access control and nothing
is reachable from the network.

Endpoints (every error is ``{"error": <text>, "code": <HTTP status>, "field"?: <name>}``):

* ``GET /runtime``: runtime URL, domain, pid, configuration;
* ``GET /stubs``: every stub's :meth:`~protofly.registry.StubRecord.summary` plus ``history`` and ``pid``;
* ``POST /stubs/{domain-or-url}`` and ``POST /stubs/{domain}/retry``: NDJSON, one event per line as the
  deployment goes (``step``, ``status``, ``live``, ...), then ``{"event": "result", "ok": ...}``;
* ``DELETE /stubs/{domain}``: unload;
* ``POST /send[?timeout=S]``: a reTHINK message in, its response message out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from protofly import address, message
from protofly.bus import BusClosedError
from protofly.events import RuntimeEvent, as_json
from protofly.log import get_logger
from protofly.registry import StubRecord

__all__ = [
    "ENV_ADMIN",
    "SOCKET_NAME",
    "AdminClient",
    "AdminError",
    "AdminServer",
    "AdminUnavailableError",
    "admin_socket",
    "stub_view",
]

log = get_logger("protofly.admin")

#: The socket's file name inside the runtime's state directory.
SOCKET_NAME = "admin.sock"
#: Environment variable naming the admin socket (for ``runtime serve`` and for the client commands).
ENV_ADMIN = "PROTOFLY_ADMIN"
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Longest ``/send`` timeout a caller may ask for, in seconds.
MAX_SEND_TIMEOUT = 300.0
#: Seconds the server waits beyond ``deploy_timeout`` before it reports a deployment as timed out itself.
DEPLOY_GRACE = 10.0
#: The local address ``/send`` uses as ``from`` when the message has none: ``<runtimeURL>/cli``.
CLI_COMPONENT = "cli"
#: Longest NDJSON line the client accepts (a deploy result with a long history is a few KiB).
MAX_EVENT_LINE = 4 << 20
#: Progress lines held for one deploy stream while its client reads slowly.
STREAM_BACKLOG = 1000


class AdminError(Exception):
    """An admin request that failed: ``status`` is the HTTP status, ``field`` the input at fault (if any)."""

    def __init__(self, text: str, status: int = 400, field: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.field = field

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.text, "code": self.status}
        if self.field is not None:
            body["field"] = self.field
        return body


class AdminUnavailableError(AdminError):
    """Nothing answers on the admin socket: no runtime is running there (or it is not ours to reach)."""


def admin_socket(
    *,
    admin: Path | str | None = None,
    state_dir: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """Where the admin socket is: ``admin``, else ``$PROTOFLY_ADMIN``, else ``<state_dir>/admin.sock``.

    The server and the clients use this one rule, so a client started in the runtime's environment finds
    the runtime's socket.  None when nothing says where.
    """
    env = os.environ if environ is None else environ
    if admin:
        return Path(admin).expanduser()
    if env.get(ENV_ADMIN):
        return Path(env[ENV_ADMIN]).expanduser()
    if state_dir:
        return Path(state_dir).expanduser() / SOCKET_NAME
    return None


def stub_view(record: StubRecord) -> dict[str, Any]:
    """A stub as the admin API shows it: the registry's summary, its status history and its process id."""
    view = record.summary()
    view["history"] = [dataclasses.asdict(event) for event in record.history]
    view["pid"] = record.info.get("pid")
    return view


# -- server ------------------------------------------------------------------------------------------------


async def _claim_socket(path: Path) -> tuple[socket.socket, int]:
    """Bind and listen on ``path`` (mode 0600), replacing a stale socket file but never a live runtime.

    Returns the listening socket and the file's inode (so that closing removes only our own file).

    Listening right away (before the runtime starts) makes a second runtime started meanwhile find this one
    answering instead of taking the path over as stale.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise AdminError(
            f"admin socket path {path} is {len(os.fsencode(path))} bytes, over the {MAX_SOCKET_PATH}-byte limit "
            "of unix sockets; give a shorter one with --admin",
            field="admin",
        )
    kind = await asyncio.to_thread(_file_kind, path)
    if kind == "other":
        raise AdminError(f"{path} exists and is not a socket; refusing to replace it", field="admin")
    if kind == "socket":
        if await _answers(path):
            raise AdminError(f"another protofly runtime is already listening on {path}", status=409, field="admin")
        log.info("removing stale admin socket", path=str(path))
    return await asyncio.to_thread(_bind, path, kind == "socket")


def _file_kind(path: Path) -> str | None:
    try:
        return "socket" if stat.S_ISSOCK(path.lstat().st_mode) else "other"
    except FileNotFoundError:
        return None


def _bind(path: Path, stale: bool) -> tuple[socket.socket, int]:
    if stale:
        path.unlink(missing_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window in which another user could connect
    try:
        sock.bind(os.fsencode(path))
    except OSError as exc:
        sock.close()
        raise AdminError(f"cannot create admin socket {path}: {exc.strerror}", status=500, field="admin") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock, path.stat().st_ino


def _remove_if_ours(path: Path, inode: int) -> None:
    """Unlink the socket file unless another runtime has since replaced it (then it is theirs)."""
    with contextlib.suppress(FileNotFoundError):
        if path.lstat().st_ino == inode:
            path.unlink()


async def _answers(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fsencode(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, OSError):
        return True  # it exists and does not refuse: treat it as in use rather than delete it
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class AdminServer:
    """Serves the admin API of one runtime on a unix socket.

    ``await claim()`` first (before the runtime starts, so a second runtime is refused early), then
    ``await start(runtime)``, and ``await close()`` at the end (it removes the socket file).
    """

    def __init__(self, path: Path | str, *, max_request_size: int = message.DEFAULT_MAX_SIZE) -> None:
        self.path = Path(path)
        self.max_request_size = max_request_size
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._runner: web.AppRunner | None = None
        self._runtime: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def claim(self) -> None:
        self._sock, self._inode = await _claim_socket(self.path)

    async def start(self, runtime: Any) -> None:
        """Serve ``runtime`` (a started :class:`protofly.runtime.Runtime`) on the claimed socket."""
        if self._sock is None:
            await self.claim()
        self._runtime = runtime
        runtime.registry.add_local(self.cli_url)  # no stub may send in the CLI's name
        app = web.Application(client_max_size=self.max_request_size, middlewares=[_json_errors])
        app.router.add_get("/runtime", self._get_runtime)
        app.router.add_get("/stubs", self._get_stubs)
        app.router.add_post("/stubs/{domain:[^/]+}/retry", self._retry_stub)
        app.router.add_post("/stubs/{reference:.+}", self._deploy_stub)
        app.router.add_delete("/stubs/{domain:[^/]+}", self._unload_stub)
        app.router.add_post("/send", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()  # type: ignore[arg-type]
        log.info("admin API listening", path=str(self.path), runtime_url=runtime.runtime_url)

    @property
    def cli_url(self) -> str:
        return f"{self._runtime.runtime_url}/{CLI_COMPONENT}"

    async def close(self) -> None:
        """Stop serving (open streams end), then remove the socket file if it is still ours."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        if self._inode is not None:
            inode, self._inode = self._inode, None
            await asyncio.to_thread(_remove_if_ours, self.path, inode)
        if self._runtime is not None:
            self._runtime.registry.remove_local(self.cli_url)

    async def __aenter__(self) -> AdminServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- handlers --------------------------------------------------------------------------------------

    async def _get_runtime(self, request: web.Request) -> web.Response:
        from protofly import __version__

        runtime = self._runtime
        return web.json_response(
            {
                "runtime_url": runtime.runtime_url,
                "domain": runtime.config.domain,
                "pid": os.getpid(),
                "version": __version__,
                "admin": str(self.path),
                "stubs": len(runtime.stubs()),
                "config": runtime.config.as_dict(),
            }
        )

    async def _get_stubs(self, request: web.Request) -> web.Response:
        return web.json_response([stub_view(record) for record in self._runtime.stubs()])

    async def _deploy_stub(self, request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        try:
            domain, _ = address.split_stub_reference(reference)
        except address.AddressError as exc:
            raise AdminError(f"stub reference: {exc}", field="reference") from None
        return await self._stream(request, domain, lambda: self._runtime.load_stub(reference))

    async def _retry_stub(self, request: web.Request) -> web.StreamResponse:
        domain = _domain(request.match_info["domain"])
        if self._runtime.registry.stub(domain) is None:
            raise AdminError(f"no stub is loaded for {domain}; deploy it with 'protofly stub deploy'", 404, "domain")
        return await self._stream(request, domain, lambda: self._runtime.retry_now(domain))

    async def _unload_stub(self, request: web.Request) -> web.Response:
        from protofly.runtime import StubDeploymentError

        domain = _domain(request.match_info["domain"])
        try:
            record = await asyncio.wait_for(
                self._runtime.unload_stub(domain), self._runtime.config.remove_grace + DEPLOY_GRACE
            )
        except StubDeploymentError as exc:
            raise AdminError(exc.description, exc.code, "domain") from None
        except TimeoutError:
            raise AdminError(f"unloading the stub of {domain} did not finish in time", 504) from None
        return web.json_response(stub_view(record))

    async def _send(self, request: web.Request) -> web.Response:
        runtime = self._runtime
        timeout = _timeout_parameter(request, runtime.config.request_timeout)
        raw = await request.read()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdminError(f"body: not valid JSON ({exc})", field="body") from None
        if not isinstance(data, dict):
            raise AdminError("body: expected a JSON object (a reTHINK message)", field="body")
        data.setdefault("from", self.cli_url)
        try:
            msg = message.from_dict(data)
        except message.MessageError as exc:
            text = str(exc)
            raise AdminError(text, field=text.split(":", 1)[0]) from None
        if msg.type == "response":
            raise AdminError("type: /send sends requests; a response cannot be sent from here", field="type")
        try:
            answer = await asyncio.wait_for(runtime.bus.request(msg, timeout=timeout), timeout + DEPLOY_GRACE)
        except ValueError as exc:  # the same (from, id) is already waiting for its response
            raise AdminError(str(exc), 409, "id") from None
        except BusClosedError:
            raise AdminError("the runtime is shutting down", 503) from None
        except TimeoutError:
            raise AdminError(f"no response within {timeout:g} s", 504) from None
        return web.json_response(message.as_dict(answer))

    # -- the deploy stream ---------------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, domain: str, operation: Callable[[], Awaitable[Any]]
    ) -> web.StreamResponse:
        """Run ``operation`` and stream its domain's deploy events as NDJSON, ending with the result."""
        runtime = self._runtime
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=STREAM_BACKLOG)

        def on_event(event: RuntimeEvent) -> None:
            if event.domain != domain or events.full():
                return  # a client that does not read loses progress lines, never the result line
            line = as_json(event)
            line.setdefault("at", time.time())
            events.put_nowait(line)

        unsubscribe = runtime.events.subscribe(on_event)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        task: asyncio.Task[Any] | None = None
        try:
            await response.prepare(request)
            task = asyncio.get_running_loop().create_task(operation())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: _put_end(events))
            limit = runtime.config.deploy_timeout + DEPLOY_GRACE
            try:
                async with asyncio.timeout(limit):
                    while (event := await events.get()) is not None:
                        await _write_line(response, event)
                result = _result(domain, task, runtime)
            except TimeoutError:
                result = {"event": "result", "ok": False, "domain": domain, "code": 504,
                          "description": f"no outcome within {limit:g} s"}  # fmt: skip
            await _write_line(response, result)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.info("admin client went away during a deployment; it goes on", domain=domain)
        finally:
            unsubscribe()
            if task is not None and not task.done():
                task.cancel()  # only our wait: the deployment itself is shared and shielded in the runtime
        return response


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as ``{"error", "code"}`` JSON with its HTTP status, aiohttp's own included."""
    try:
        return await handler(request)
    except AdminError as exc:
        return web.json_response(exc.as_json(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return web.json_response({"error": text, "code": exc.status}, status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("admin request failed", path=request.path, exc_info=exc)
        return web.json_response({"error": f"internal error: {exc}", "code": 500}, status=500)


def _domain(text: str) -> str:
    try:
        return address.validate_domain(text)
    except address.AddressError as exc:
        raise AdminError(f"domain: {exc}", field="domain") from None


def _timeout_parameter(request: web.Request, default: float) -> float:
    raw = request.query.get("timeout")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise AdminError(f"timeout: not a number: {raw!r}", field="timeout") from None
    if not 0 < value <= MAX_SEND_TIMEOUT:
        raise AdminError(f"timeout: must be in (0, {MAX_SEND_TIMEOUT:g}] seconds, got {raw}", field="timeout")
    return value


def _result(domain: str, task: asyncio.Task[Any], runtime: Any) -> dict[str, Any]:
    """The stream's last line: the handle's summary when live, else the code and reason."""
    from protofly.runtime import StubDeploymentError

    if task.cancelled():
        return {"event": "result", "ok": False, "domain": domain, "code": 503, "description": "deployment cancelled"}
    exc = task.exception()
    if exc is None:
        handle = task.result()
        return {
            "event": "result",
            "ok": True,
            **stub_view(handle.record),
            "version": handle.version,
            "signer": handle.signer,
            "catalogue_url": handle.catalogue_url,
            "from_cache": handle.from_cache,
            "steps": [dataclasses.asdict(step) for step in handle.steps],
            "total_ms": round(handle.total_ms, 3),
        }
    result: dict[str, Any] = {"event": "result", "ok": False, "domain": domain}
    if isinstance(exc, StubDeploymentError):
        result.update(code=exc.code, description=exc.description, cause=exc.cause)
    else:
        log.error("deployment raised", domain=domain, exc_info=exc)
        result.update(code=500, description=f"{type(exc).__name__}: {exc}")
    record = runtime.registry.stub(domain)
    if record is not None:
        result["history"] = stub_view(record)["history"]
        result["url"] = record.url
    return result


def _put_end(events: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Mark the end of a deploy stream; room is made for it, so the result line always follows."""
    if events.full():
        events.get_nowait()
    events.put_nowait(None)


async def _write_line(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(json.dumps(event, default=str).encode() + b"\n")


# -- client ------------------------------------------------------------------------------------------------


class AdminClient:
    """Talks to a runtime's admin API over its unix socket: ``async with AdminClient(path) as admin``.

    Raises :class:`AdminUnavailableError` when no runtime listens there and :class:`AdminError` with the
    server's text and status for a refused request.
    """

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        connector = aiohttp.UnixConnector(path=str(self.path))
        self._session = aiohttp.ClientSession(
            base_url="http://protofly-admin", connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def runtime(self) -> dict[str, Any]:
        return await self._json("GET", "/runtime")

    async def stubs(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/stubs")

    async def unload(self, domain: str) -> dict[str, Any]:
        return await self._json("DELETE", f"/stubs/{quote(domain, safe='')}")

    async def send(self, msg: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send a message (``from`` defaults to ``<runtimeURL>/cli``) and return the response message."""
        params = {} if timeout is None else {"timeout": str(timeout)}
        wait = (timeout or self.timeout) + DEPLOY_GRACE
        return await self._json("POST", "/send", json=dict(msg), params=params, total=wait)

    def deploy(self, reference: str, *, timeout: float = 300.0) -> AsyncIterator[dict[str, Any]]:
        """The deploy events of ``reference`` (a domain or a catalogue URL) as they come; the last is the result."""
        return self._events(f"/stubs/{quote(reference, safe='')}", timeout)

    def retry(self, domain: str, *, timeout: float = 300.0) -> AsyncIterator[dict[str, Any]]:
        """Like :meth:`deploy`, after forgetting the stub's crash history and backoff (a fresh catalogue fetch)."""
        return self._events(f"/stubs/{quote(domain, safe='')}/retry", timeout)

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with AdminClient(path)'")
        return self._session

    async def _json(self, method: str, path: str, *, total: float | None = None, **kwargs: Any) -> Any:
        timeout = aiohttp.ClientTimeout(total=total or self.timeout)
        async with self._guard():
            async with self.session.request(method, path, timeout=timeout, **kwargs) as response:
                await _raise_for_error(response)
                return await response.json(content_type=None)

    async def _events(self, path: str, timeout: float) -> AsyncIterator[dict[str, Any]]:
        async with self._guard():
            async with self.session.post(path, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                await _raise_for_error(response)
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    if len(buffer) > MAX_EVENT_LINE:
                        raise AdminError(f"an event line is over {MAX_EVENT_LINE} bytes", 502)
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
                if buffer.strip():
                    yield json.loads(buffer)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turn transport failures into the two errors the CLI knows how to explain."""
        try:
            yield
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror if exc.os_error is not None else str(exc)
            raise AdminUnavailableError(
                f"no protofly runtime is listening on {self.path} ({reason}); start one with 'protofly runtime serve'",
                503,
            ) from None
        except TimeoutError:
            raise AdminError(f"the runtime at {self.path} did not answer in time", 504) from None
        except aiohttp.ClientError as exc:
            raise AdminError(f"talking to the runtime at {self.path} failed: {exc}", 502) from None
        except json.JSONDecodeError as exc:
            raise AdminError(f"the runtime at {self.path} sent something that is not JSON: {exc}", 502) from None


async def _raise_for_error(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    text = await response.text()
    try:
        body = json.loads(text)
        raise AdminError(str(body["error"]), response.status, body.get("field"))
    except (ValueError, KeyError, TypeError):
        raise AdminError(f"HTTP {response.status}: {text[:200]}", response.status) from None
