"""The sandbox host: the main program of a stub's process (``python -I -m protofly.sandbox.host SETTINGS``).

It speaks the sandbox control protocol, which is itself reTHINK messages, over the socketpair
whose descriptor number is in ``SETTINGS`` (a JSON object given by the runtime):

* on start it announces ``update {value: "ready"}`` to ``hyperty-runtime://sandbox/external``;
* ``create`` to ``hyperty-runtime://sandbox/internal`` with ``{url, sourceCode, config,
  sourceCodeClassname, sandbox: <limits>}`` confines the process (:mod:`protofly.sandbox.confine`), reports
  the layers (``update {value: "isolation", report}``) *before* any stub code runs, then executes the
  source and activates the stub; the answer is ``200`` or ``500`` with the error's summary;
* ``execute`` to the stub's URL with ``{method, params}`` runs ``connect``/``disconnect``/``init``/...
  (``200`` with ``value``, ``404`` for an unknown method, ``500`` with the error);
* ``delete`` with ``{url}`` answers ``200`` and ends the process;
* ``read {resource: "liveness"}`` (the runtime's ping) is answered ``200`` from the event loop the stub
  runs on, with the SDK's view of the stub (:func:`protofly.stub.pong`): no answer means the loop is blocked;
* every other message is the runtime's traffic for the stub and goes to its bus listeners.

The host asks the runtime for the stub's connections (the stub has no network of its own): ``execute``
from ``.../sandbox/internal`` to ``.../sandbox/external`` with ``{method: "open-connection", params:
[url]}``; the answer is ``200`` with the connected socket passed on the second socketpair (``egress_fd``
in ``SETTINGS``, :mod:`protofly.sandbox.fdpass`), or an error code with the reason.

When the stub exhausts its memory (``MemoryError`` anywhere) the host sends its last words, ``update
{value: "failed", description: "memory limit (MemoryError)"}``, and exits with :data:`EXIT_MEMORY`.
A pre-started host waits with its imports done, so that a deploy costs only the stub's own start.

Imports are kept to asyncio, msgspec and the SDK: this module runs once per stub.  It never logs message
contents or ``execute`` parameters (credentials travel there).
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import io
import logging
import os
import socket
import sys
import time
from typing import Any

import msgspec

from protofly.message import Message, MessageError, encode, response
from protofly.sandbox import confine, loader
from protofly.sandbox.channel import (
    DEFAULT_MAX_FRAME,
    LIVENESS,
    SANDBOX_EXTERNAL,
    SANDBOX_INTERNAL,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    control,
)
from protofly.sandbox.fdpass import SocketInbox
from protofly.sandbox.limits import Limits
from protofly.stub import AuthenticationFailed, Bus, EgressError, MethodNotFound, pong, summary

__all__ = ["EXIT_BAD_SETTINGS", "EXIT_MEMORY", "Host", "main"]

#: Exit code after a ``MemoryError`` (the stub reached its address-space limit).
EXIT_MEMORY = 86
#: Exit code when the settings argument is unusable.
EXIT_BAD_SETTINGS = 2
#: Messages for the stub accepted before it exists (the runtime sends none; a bound against misuse).
_MAX_BACKLOG = 10_000
#: How long the host waits for the runtime's answer to ``open-connection`` (the runtime's connect timeout
#: is shorter; this bound only covers a runtime that never answers).
_OPEN_WAIT = 60.0
#: ``open-connection`` requests a stub may have outstanding at once.
_MAX_OPENING = 32

_log = logging.getLogger("protofly.sandbox.host")


class Host(asyncio.Protocol):
    """One stub's side of the channel: control requests in, the stub's messages out."""

    def __init__(self, settings: dict[str, Any], sock: socket.socket) -> None:
        max_frame = int(settings.get("max_frame", DEFAULT_MAX_FRAME))
        self.settings = settings
        self.sock = sock
        self.decoder = FrameDecoder(max_frame)
        self.encoder = FrameEncoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.url: str | None = None
        self.stub: object | None = None
        self.bus: Bus | None = None
        self.backlog: list[Message] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.creating = False
        self.flush_scheduled = False
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[int] = self.loop.create_future()
        egress_fd = settings.get("egress_fd")
        self.inbox = SocketInbox(socket.socket(fileno=int(egress_fd))) if egress_fd is not None else None
        self.opening: dict[int, asyncio.Future[Message]] = {}
        self.next_open = 0

    async def serve(self) -> int:
        self.loop.set_exception_handler(self._loop_exception)
        await self.loop.connect_accepted_socket(lambda: self, self.sock)
        return await self.done

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        body = {"value": "ready", "pid": os.getpid(), "python": sys.version.split()[0]}
        self.send(control("update", body, sender=SANDBOX_INTERNAL, to=SANDBOX_EXTERNAL))

    def data_received(self, data: bytes) -> None:
        try:
            for event in self.decoder.feed(data):
                if isinstance(event, FrameError):
                    _log.warning("dropped a frame from the runtime: %s (%d bytes)", event.kind, event.size)
                elif event.from_ == SANDBOX_EXTERNAL:
                    self._control(event)
                else:
                    self._to_stub(event)
        except MemoryError:
            self.fatal("memory limit (MemoryError)", EXIT_MEMORY)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(0)

    # -- outgoing -----------------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Queue a message for the runtime; everything queued in one loop iteration leaves as one frame."""
        self.encoder.add(msg)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        data = self.encoder.flush()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fatal(self, reason: str, code: int) -> None:
        """Last words, written synchronously, then exit at once (the stub cannot be trusted to unwind)."""
        try:
            try:
                self.encoder.add(
                    control(
                        "update",
                        {"value": "failed", "description": reason},
                        sender=SANDBOX_INTERNAL,
                        to=SANDBOX_EXTERNAL,
                    )
                )
            except MemoryError:
                pass
            data = self.encoder.flush()
            fd = self.sock.fileno()
            if fd >= 0:
                os.set_blocking(fd, True)
                while data:
                    data = data[os.write(fd, data) :]
        except BaseException:
            pass  # nothing may stop the exit below
        finally:
            os._exit(code)

    def _respond(self, request: Message, code: int, description: str | None = None, value: Any = None) -> None:
        answer = response(request, code, description, value=value)
        try:
            encode(answer)
        except (TypeError, msgspec.EncodeError):
            answer = response(request, code, description or "the result is not JSON-serialisable")
        try:
            self.send(answer)
        except MessageError as exc:
            self.send(response(request, 500, f"the response is too large ({exc})"))

    # -- control ------------------------------------------------------------------------------------

    def _control(self, msg: Message) -> None:
        if msg.type == "response":
            future = self.opening.get(msg.id) if isinstance(msg.id, int) else None
            if future is not None and not future.done():
                future.set_result(msg)
        elif msg.type == "create":
            self._spawn(self._create(msg))
        elif msg.type == "execute":
            self._spawn(self._execute(msg))
        elif msg.type == "delete":
            self._delete(msg)
        elif msg.type == "read" and (msg.body or {}).get("resource") == LIVENESS:
            self._pong(msg)
        else:
            self._respond(msg, 400, f"unknown control message type {msg.type!r}")

    async def open_connection(self, url: str) -> socket.socket:
        """The stub's connector: ask the runtime to connect to ``url`` and take the socket it passes."""
        if self.inbox is None:
            raise EgressError(403, f"egress: {url} refused: this sandbox has no socket channel")
        if len(self.opening) >= _MAX_OPENING:
            raise EgressError(429, f"egress: {url} refused: {_MAX_OPENING} connections are being opened already")
        self.next_open += 1
        request_id = self.next_open
        future: asyncio.Future[Message] = self.loop.create_future()
        self.opening[request_id] = future
        body = {"method": "open-connection", "params": [url]}
        try:
            self.send(control("execute", body, msg_id=request_id, sender=SANDBOX_INTERNAL, to=SANDBOX_EXTERNAL))
            answer = await asyncio.wait_for(future, _OPEN_WAIT)
        except TimeoutError:
            raise EgressError(504, f"egress: the runtime did not answer for {url} within {_OPEN_WAIT:g} s") from None
        finally:
            self.opening.pop(request_id, None)
        answer_body = answer.body or {}
        code = answer_body.get("code")
        if code != 200:
            description = str(answer_body.get("description") or f"egress: {url} refused")
            raise EgressError(code if isinstance(code, int) else 500, description)
        sock = self.inbox.claim(str(request_id), pending=[str(key) for key in self.opening])
        if sock is None:
            raise EgressError(502, f"egress: the runtime answered for {url} without passing a socket")
        return sock

    def _spawn(self, coro: Any) -> None:
        # A hand-written owned set rather than protofly.tasks.TaskSet: TaskSet logs through structlog,
        # whose import would double the start time of every sandbox host.
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _create(self, msg: Message) -> None:
        body = msg.body or {}
        if self.stub is not None or self.creating:
            self._respond(msg, 500, f"this sandbox already runs {self.url}")
            return
        problem = _create_problem(body)
        limits: Limits | None = None
        if problem is None and body.get("sandbox"):
            try:
                limits = Limits.from_dict(body["sandbox"])
            except ValueError as exc:
                problem = f"create: body.sandbox: {exc}"
        if problem:
            self._respond(msg, 400, problem)
            return
        self.creating = True
        self.url = body["url"]
        started = time.perf_counter()
        report = confine.apply(limits, self.settings)
        confined = time.perf_counter()
        self.send(
            control("update", {"value": "isolation", "report": report}, sender=SANDBOX_INTERNAL, to=SANDBOX_EXTERNAL)
        )
        self.flush()
        self.bus = Bus(
            self.send,
            on_fatal=lambda exc: self.fatal("memory limit (MemoryError)", EXIT_MEMORY),
            connector=self.open_connection,
        )
        try:
            self.stub = await loader.load(
                body["sourceCode"],
                url=body["url"],
                config=body.get("config") or {},
                classname=body.get("sourceCodeClassname"),
                bus=self.bus,
            )
        except loader.LoadError as exc:
            self._respond(msg, 500, exc.summary)
            return
        except MemoryError:
            self.fatal("memory limit (MemoryError)", EXIT_MEMORY)
        finally:
            self.creating = False
        # How long confinement and the stub's own start took, for the deploy timeline (a figure the stub
        # could alter, as it runs in this process: shown, never acted on).
        timing = {"confine": _ms(confined - started), "load": _ms(time.perf_counter() - confined)}
        self._respond(msg, 200, value={"ms": timing})
        backlog, self.backlog = self.backlog, []
        for queued in backlog:
            self._to_stub(queued)

    async def _execute(self, msg: Message) -> None:
        body = msg.body or {}
        method = body.get("method")
        params = body.get("params")
        if params is None:
            params = []
        if self.stub is None:
            self._respond(msg, 409, "no stub is deployed in this sandbox")
            return
        if not isinstance(method, str) or not isinstance(params, list):
            self._respond(msg, 400, "execute needs body.method (a string) and body.params (a list)")
            return
        try:
            value = await loader.execute(self.stub, method, params)
        except MethodNotFound as exc:
            self._respond(msg, 404, str(exc))
        except AuthenticationFailed as exc:
            self._respond(msg, 401, summary(exc))
        except MemoryError:
            self.fatal("memory limit (MemoryError)", EXIT_MEMORY)
        except Exception as exc:
            self._respond(msg, 500, summary(exc))
        else:
            self._respond(msg, 200, value=value)

    def _pong(self, msg: Message) -> None:
        """Answer the runtime's liveness ping.  This runs on the stub's event loop, so a stub that blocks the
        loop (a busy loop, a deadlock) leaves the ping unanswered and the runtime ends it as unresponsive."""
        self._respond(msg, 200, value=pong(self.stub))

    def _delete(self, msg: Message) -> None:
        self._respond(msg, 200)
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # -- data ---------------------------------------------------------------------------------------

    def _to_stub(self, msg: Message) -> None:
        bus = self.bus
        if bus is None or self.stub is None:
            if len(self.backlog) < _MAX_BACKLOG:
                self.backlog.append(msg)
            return
        bus.dispatch(msg)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), MemoryError):
            self.fatal("memory limit (MemoryError)", EXIT_MEMORY)
        loop.default_exception_handler(context)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _create_problem(body: dict[str, Any]) -> str | None:
    """What is wrong with a ``create`` body, naming the field, or None."""
    if not isinstance(body.get("url"), str) or not body["url"]:
        return "create: body.url must be a non-empty string"
    if not isinstance(body.get("sourceCode"), str):
        return "create: body.sourceCode must be a string"
    if not isinstance(body.get("config") or {}, dict):
        return "create: body.config must be an object"
    classname = body.get("sourceCodeClassname")
    if classname is not None and not isinstance(classname, str):
        return "create: body.sourceCodeClassname must be a string"
    limits = body.get("sandbox")
    if limits is not None and not isinstance(limits, dict):
        return "create: body.sandbox must be an object of limits"
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point; never returns (exits with ``os._exit`` so that stub threads cannot hold it up)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = msgspec.json.decode(args[0], type=dict[str, Any])
        fd = int(settings["fd"])
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError, ValueError, IndexError):
        sys.stderr.write("usage: python -I -m protofly.sandbox.host '{\"fd\": N, ...}'\n")
        sys.stderr.flush()
        os._exit(EXIT_BAD_SETTINGS)
    _wait_for_placement(settings.get("gate_fd"))
    user = settings.get("user")
    if user is not None:
        try:
            confine.drop_user(int(user[0]), int(user[1]))
        except (OSError, TypeError, ValueError, IndexError) as exc:
            sys.stderr.write(f"cannot become the sandbox user {user!r}: {exc}\n")
            sys.stderr.flush()
            os._exit(EXIT_BAD_SETTINGS)
    confine.set_parent_death_signal(settings.get("parent_pid"))
    if settings.get("node_spare"):  # a JavaScript stub's host: confine, then become Node (no return)
        from protofly.sandbox.node_exec import exec_spare

        exec_spare(settings)
    if isinstance(sys.stdout, io.TextIOWrapper):  # it is, unless something replaced it
        sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _preload(settings.get("preload") or ())
    _warm_compiler()
    code = 1
    try:
        sock = socket.socket(fileno=fd)
        code = asyncio.run(_serve(settings, sock))
    except MemoryError:
        code = EXIT_MEMORY
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _wait_for_placement(fd: Any) -> None:
    """Hold until the runtime has put this process in its cgroup (a byte, or EOF if the runtime is gone).

    Under bwrap the hold is bwrap's own ``--block-fd`` and there is no ``gate_fd``; without bwrap the host
    waits here, before its imports, so that what it allocates is charged to the stub's cgroup.
    """
    if isinstance(fd, int):
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)


def _preload(modules: Any) -> None:
    """Import what stubs commonly need before the host says it is ready, so a deploy does not pay for it.

    A pre-started host does this while idle (the template has done the imports); a module that
    cannot be imported is reported on stderr (the runtime's log) and the stub may still import it itself.
    """
    for name in modules:
        try:
            importlib.import_module(str(name))
        except Exception as exc:  # any import failure is only a missed optimisation
            sys.stderr.write(f"WARNING protofly.sandbox.host: preload of {name!r} failed: {exc!r}\n")


def _warm_compiler() -> None:
    """Compile a module once while idle, so that compiling the stub's source is not the process's first;
    then hand the heap the imports and that compile left free back to the system.

    The first compile in a fresh interpreter is markedly slower than the next ones (measured on the 50 KB
    message node stub: ~11 ms of CPU first, ~9 ms after compiling the SDK's 21 KB source).  The SDK is
    that source: every host has imported it.  ``malloc_trim`` keeps this from costing memory: without it
    the idle host keeps the freed heap (+1 MB with this warm-up, +3.5 MB with a 75 KB one).  The result is
    thrown away; any failure only loses the head start.
    """
    path = getattr(sys.modules.get("protofly.stub"), "__file__", None)
    if isinstance(path, str):
        try:
            with open(path, encoding="utf-8") as file:
                compile(file.read(), path, "exec", dont_inherit=True)
        except (OSError, ValueError, SyntaxError):
            pass
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere there is nothing to trim this way
    except (AttributeError, OSError):
        pass


async def _serve(settings: dict[str, Any], sock: socket.socket) -> int:
    return await Host(settings, sock).serve()


if __name__ == "__main__":
    main()
