"""The admin API of one runtime: JSON over HTTP on a unix socket, and the claiming of that socket.

A unix socket and not a TCP port because the admin API can load code and send messages in the runtime's
name: the socket is created mode 0600 in the runtime's state directory, so file permissions are the access
control and nothing is reachable from the network.  The endpoints are listed in :mod:`protofly.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from protofly import address, message
from protofly.admin.protocol import (
    CLI_COMPONENT,
    DEPLOY_GRACE,
    MAX_SEND_TIMEOUT,
    MAX_SOCKET_PATH,
    AdminError,
)
from protofly.admin.views import Line, event_line, failed_result, live_result, stub_view
from protofly.bus import BusClosedError
from protofly.deploy import StubDeploymentError, StubHandle
from protofly.events import RuntimeEvent
from protofly.log import get_logger
from protofly.state import StateDirError, check_private_dir
from protofly.tasks import TaskSet

if TYPE_CHECKING:
    from protofly.runtime import Runtime

__all__ = ["STREAM_BACKLOG", "AdminServer", "send_body"]

log = get_logger("protofly.admin")

#: Progress lines held for one deploy stream while its client reads slowly.
STREAM_BACKLOG = 1000
#: Seconds a stale-looking socket gets to accept a connection before it is judged (in use) and left alone.
PROBE_TIMEOUT = 2.0
#: Seconds ``close()`` waits for the deployments it started to notice their cancellation.
CLOSE_TIMEOUT = 5.0


# -- claiming the socket -------------------------------------------------------------------------------------


async def claim_socket(path: Path) -> tuple[socket.socket, int]:
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
    try:  # first the directory: a socket found in a directory others control proves nothing
        await asyncio.to_thread(check_private_dir, path.parent, what="admin socket directory")
    except StateDirError as exc:
        raise AdminError(str(exc), status=500, field="admin") from None
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
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), PROBE_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, OSError):
        return True  # it exists and does not refuse: treat it as in use rather than delete it
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# -- the server ----------------------------------------------------------------------------------------------


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
        self._runtime: Runtime | None = None
        #: The deployments the streams started: a stream that ends early cancels only its wait, and
        #: close() cancels whatever is left.
        self._tasks = TaskSet("admin")

    async def claim(self) -> None:
        self._sock, self._inode = await claim_socket(self.path)

    async def start(self, runtime: Runtime) -> None:
        """Serve ``runtime`` (a started :class:`protofly.runtime.Runtime`) on the claimed socket."""
        if self._sock is None:
            await self.claim()
        sock = self._sock
        assert sock is not None  # claim() set it or raised
        self._runtime = runtime
        runtime.registry.add_local(self.cli_url)  # no stub may send in the CLI's name
        app = web.Application(client_max_size=self.max_request_size, middlewares=[_json_errors])
        app.router.add_get("/runtime", self._get_runtime)
        app.router.add_get("/stubs", self._get_stubs)
        app.router.add_post("/stubs/{domain:[^/]+}/retry", self._retry_stub)
        app.router.add_put("/stubs/{domain:[^/]+}/credentials", self._set_credentials)
        app.router.add_post("/stubs/{reference:.+}", self._deploy_stub)
        app.router.add_delete("/stubs/{domain:[^/]+}", self._unload_stub)
        app.router.add_post("/send", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("admin API listening", path=str(self.path), runtime_url=runtime.runtime_url)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the admin server is not started: call start(runtime)")
        return self._runtime

    @property
    def cli_url(self) -> str:
        """``<runtimeURL>/cli``: the local address messages sent from the CLI come from."""
        return f"{self.runtime.runtime_url}/{CLI_COMPONENT}"

    async def close(self) -> None:
        """Stop serving (open streams end), then remove the socket file if it is still ours."""
        await self._tasks.close(CLOSE_TIMEOUT)
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
            runtime, self._runtime = self._runtime, None
            runtime.registry.remove_local(f"{runtime.runtime_url}/{CLI_COMPONENT}")

    async def __aenter__(self) -> AdminServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- handlers --------------------------------------------------------------------------------------

    async def _get_runtime(self, request: web.Request) -> web.Response:
        from protofly import __version__

        runtime = self.runtime
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
        return web.json_response([stub_view(record) for record in self.runtime.stubs()])

    async def _deploy_stub(self, request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        try:
            domain, _ = address.split_stub_reference(reference)
        except address.AddressError as exc:
            raise AdminError(f"stub reference: {exc}", field="reference") from None
        return await self._stream(request, domain, lambda: self.runtime.load_stub(reference))

    async def _retry_stub(self, request: web.Request) -> web.StreamResponse:
        domain = _domain(request.match_info["domain"])
        if self.runtime.registry.stub(domain) is None:
            raise AdminError(f"no stub is loaded for {domain}; deploy it with 'protofly stub deploy'", 404, "domain")
        return await self._stream(request, domain, lambda: self.runtime.retry_now(domain))

    async def _set_credentials(self, request: web.Request) -> web.Response:
        """New credentials for a domain (a JSON object); the stub uses them from its next connect."""
        domain = _domain(request.match_info["domain"])
        try:  # the message decoder's rules: what is accepted here can be sent to the stub later
            data = message.loads(await request.read(), what="body", max_size=self.max_request_size)
        except message.MessageError as exc:
            raise AdminError(str(exc), field="body") from None
        if not isinstance(data, dict):
            raise AdminError("body: expected a JSON object of credentials", field="body")
        self.runtime.set_credentials(domain, data)
        return web.json_response({"domain": domain, "credentials": "set"})

    async def _unload_stub(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        domain = _domain(request.match_info["domain"])
        try:
            record = await asyncio.wait_for(runtime.unload_stub(domain), runtime.config.remove_grace + DEPLOY_GRACE)
        except StubDeploymentError as exc:
            raise AdminError(exc.description, exc.code, "domain") from None
        except TimeoutError:
            raise AdminError(f"unloading the stub of {domain} did not finish in time", 504) from None
        return web.json_response(stub_view(record))

    async def _send(self, request: web.Request) -> web.Response:
        runtime = self.runtime
        timeout = _timeout_parameter(request, runtime.config.request_timeout)
        msg = send_body(await request.read(), self.cli_url, self.max_request_size)
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
        self, request: web.Request, domain: str, operation: Callable[[], Coroutine[Any, Any, StubHandle]]
    ) -> web.StreamResponse:
        """Run ``operation`` and stream its domain's runtime events as NDJSON, ending with the result.

        One subscription to the runtime's event stream for the whole request; its lines go through a
        bounded queue, so a client that does not read costs at most ``STREAM_BACKLOG`` lines of memory.
        """
        runtime = self.runtime
        lines: asyncio.Queue[Line | None] = asyncio.Queue(maxsize=STREAM_BACKLOG)

        def on_event(event: RuntimeEvent) -> None:
            if event.domain != domain or lines.full():
                return  # a client that does not read loses progress lines, never the result line
            lines.put_nowait(event_line(event, time.time()))

        unsubscribe = runtime.events.subscribe(on_event)
        try:
            # Shared: its failure is this stream's result line, not a background error to log.
            task = self._tasks.spawn(operation(), name=f"admin-deploy-{domain}", shared=True)
        except RuntimeError:  # close() has begun: no new deployment from here
            unsubscribe()
            raise AdminError("the runtime is shutting down", 503) from None
        task.add_done_callback(lambda _: _put_end(lines))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            await response.prepare(request)
            limit = runtime.config.deploy_timeout + DEPLOY_GRACE
            try:
                async with asyncio.timeout(limit):
                    while (line := await lines.get()) is not None:
                        await _write_line(response, line)
                result = _result(domain, task, runtime)
            except TimeoutError:
                result = failed_result(domain, 504, f"no outcome within {limit:g} s")
            await _write_line(response, result)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.info("admin client went away during a deployment; it goes on", domain=domain)
        finally:
            unsubscribe()
            if not task.done():
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


def send_body(raw: bytes, sender: str, max_size: int = message.DEFAULT_MAX_SIZE) -> message.Message:
    """The message a ``/send`` body asks for, ``from`` defaulting to ``sender``; or a ``400`` naming the field.

    Parsed by the message decoder's own rules (:func:`protofly.message.loads`), so invalid UTF-8, ``NaN``,
    nesting deeper than the decoder's limit and numbers out of range are a ``400``, never a ``500``.
    """
    try:
        data = message.loads(raw, what="body", max_size=max_size)
        if not isinstance(data, dict):
            raise message.MessageError("body: expected a JSON object (a reTHINK message)")
        data.setdefault("from", sender)
        msg = message.from_dict(data, max_size=max_size)
    except message.MessageError as exc:
        text = str(exc)
        raise AdminError(text, field=text.split(":", 1)[0]) from None
    if msg.type == "response":
        raise AdminError("type: /send sends requests; a response cannot be sent from here", field="type")
    return msg


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


def _result(domain: str, task: asyncio.Task[StubHandle], runtime: Runtime) -> Line:
    """The stream's last line: the handle's summary when live, else the code and reason."""
    if task.cancelled():
        return failed_result(domain, 503, "deployment cancelled")
    exc = task.exception()
    if exc is None:
        return live_result(task.result())
    record = runtime.registry.stub(domain)
    if isinstance(exc, StubDeploymentError):
        return failed_result(domain, exc.code, exc.description, cause=exc.cause, record=record)
    log.error("deployment raised", domain=domain, exc_info=exc)
    return failed_result(domain, 500, f"{type(exc).__name__}: {exc}", record=record)


def _put_end(lines: asyncio.Queue[Line | None]) -> None:
    """Mark the end of a deploy stream; room is made for it, so the result line always follows."""
    if lines.full():
        lines.get_nowait()
    lines.put_nowait(None)


async def _write_line(response: web.StreamResponse, line: Line) -> None:
    await response.write(json.dumps(line, default=str).encode() + b"\n")
