"""ProcessSandbox: every stub in its own OS process (the default sandbox).

Per stub: a ``python -I -m protofly.sandbox.host`` process (under bubblewrap where it works), its own
session and process group, a scrubbed environment, a private working directory, rlimits, Landlock and
seccomp applied inside before the stub's code runs (see :mod:`~protofly.sandbox.isolation` and
:mod:`~protofly.sandbox.confine`).  The channel is a socketpair carrying length-prefixed JSON frames
(:mod:`~protofly.sandbox.channel`); the stub's stdout and stderr are read here and logged line by line
with the stub's URL bound.

Start cost: importing asyncio and msgspec takes most of a Python start, so the sandbox keeps ``prestart``
host processes started and idle (imports done, no stub code, no limits yet).  A deploy takes one, and a
replacement is started in the background.  Isolation stays per stub: every host is its own bwrap
sandbox and process, and it applies the stub's own limits when the stub arrives; a host never serves two
stubs.

Process hygiene: the exit of the direct child is watched through a pidfd, so a crash is reported as
``failed`` at once; ``remove()`` goes disconnect → grace → SIGTERM → SIGKILL → reap; if the runtime dies,
``bwrap --die-with-parent`` or ``PR_SET_PDEATHSIG`` takes the stubs with it; at interpreter exit any
process still running is killed and reaped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from protofly.log import get_logger
from protofly.message import Message, MessageError, error_description, response_code
from protofly.sandbox import (
    DEFAULT_LIMITS,
    Boundary,
    Component,
    DeployError,
    Limits,
    Sandbox,
    SandboxError,
)
from protofly.sandbox import isolation as iso
from protofly.sandbox.channel import (
    DEFAULT_MAX_FRAME,
    SANDBOX_EXTERNAL,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    control,
)
from protofly.sandbox.guard import Guard, failed_status, new_counters
from protofly.sandbox.host import EXIT_MEMORY

__all__ = ["ProcessComponent", "ProcessSandbox", "describe_exit"]

_log = get_logger("protofly.sandbox")

#: Bytes queued towards a stub beyond which further posts are dropped and counted (the stub is stuck).
_HIGH_WATER = 16 << 20
_TERM_WAIT = 1.0
_KILL_WAIT = 5.0
#: After the channel closes under a live process, how long to wait for its exit before killing it.
_CHANNEL_GRACE = 0.1
_LINE_LIMIT = 4000
#: Output lines logged per stub: a burst of this many, then this many per second.
_LINE_BURST = 200
_LINE_RATE = 100.0
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "critical"}

#: Every host process not yet reaped, so that interpreter exit can kill and reap them.
_LIVE: set[ProcessComponent] = set()


def describe_exit(returncode: int, *, bwrap: bool) -> str:
    """The reason a host ended, from its exit status ("killed by SIGKILL", "exit code 3", ...).

    bwrap reports a child killed by signal N as exit code 128+N, so under bwrap those codes are read as
    signals.
    """
    if returncode < 0:
        return _signal_reason(-returncode)
    if bwrap and 128 < returncode < 128 + 65:
        return _signal_reason(returncode - 128)
    if returncode == EXIT_MEMORY:
        return "memory limit (MemoryError)"
    return f"exit code {returncode}"


def _signal_reason(number: int) -> str:
    if number == signal.SIGXCPU:
        return "CPU limit exceeded (SIGXCPU)"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"killed by {name}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (bwrap's helpers and the host), read from /proc, nearest first."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop(0)
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                children = [int(x) for x in handle.read().split()]
        except (OSError, ValueError):
            continue
        found.extend(children)
        queue.extend(children)
    return found


def _signal_pid(pid: int, sig: int) -> None:
    """Signal a process that is not our child through a pidfd, so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def _secret_strings(value: Any, found: set[str]) -> None:
    if isinstance(value, str):
        if len(value) >= 4:
            found.add(value)
    elif isinstance(value, dict):
        for item in value.values():
            _secret_strings(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _secret_strings(item, found)


class _Channel(asyncio.Protocol):
    def __init__(self, component: ProcessComponent) -> None:
        self.component = component

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.component._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.component._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.component._on_channel_lost()


class _Lines(asyncio.Protocol):
    """Splits a pipe into lines for the log; a line longer than the limit is cut, never buffered whole."""

    def __init__(self, component: ProcessComponent, stream: str) -> None:
        self.component = component
        self.stream = stream
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            self.component._output(self.stream, bytes(buffer[:end]))
            del buffer[: end + 1]
        if len(buffer) > _LINE_LIMIT:
            self.component._output(self.stream, bytes(buffer))
            buffer.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer:
            self.component._output(self.stream, bytes(self.buffer))
            self.buffer.clear()


class ProcessComponent(Component):
    """One host process: first a pre-started spare, then the stub deployed into it."""

    def __init__(self, sandbox: ProcessSandbox, probe: iso.Probe) -> None:
        self.url = ""
        self._status_url = ""
        self.pid: int | None = None
        self.isolation: dict[str, Any] = {}
        self.counters = new_counters()
        self._sandbox = sandbox
        self._probe = probe
        self._bwrap = probe.bwrap is not None
        self._loop = asyncio.get_running_loop()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(sandbox.max_frame)
        self._encoder = FrameEncoder(sandbox.max_frame)
        self._flush_scheduled = False
        self._waiters: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._state = "starting"
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._exited = asyncio.Event()
        self._exit_reason: str | None = None
        self._last_words: str | None = None
        self._host_report: dict[str, Any] | None = None
        self._guard: Guard | None = None
        self._on_exit: Callable[[str], None] | None = None
        self._workdir: str | None = None
        self._secrets: set[str] = set()
        self._recent_stderr: deque[str] = deque(maxlen=20)
        self._tokens = float(_LINE_BURST)
        self._tokens_at = time.monotonic()
        self._throttled = False
        self._log = _log
        self._output_log = get_logger("protofly.sandbox.stub")

    # -- public interface ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``starting``, ``ready`` (a spare), ``deploying``, ``running``, ``removing`` or ``exited``."""
        return self._state

    @property
    def exit_reason(self) -> str | None:
        return self._exit_reason

    @property
    def died_before_stub_code(self) -> bool:
        """The host ended before it reported its confinement, i.e. before any stub code could run."""
        return self._state == "exited" and self._host_report is None

    def post(self, msg: Message) -> bool:
        if self._state != "running":
            self.counters["dropped_to_stub"] += 1
            return False
        if msg.from_ == SANDBOX_EXTERNAL:
            raise MessageError(f"from: {SANDBOX_EXTERNAL} is reserved for the sandbox control protocol")
        transport = self._transport
        if transport is None or transport.get_write_buffer_size() + self._encoder.pending_bytes > _HIGH_WATER:
            self.counters["dropped_to_stub"] += 1
            if self.counters["dropped_to_stub"] in (1, 10, 100) or self.counters["dropped_to_stub"] % 10_000 == 0:
                self._log.warning(
                    "the stub does not read its channel; refusing messages to it",
                    count=self.counters["dropped_to_stub"],
                )
            return False
        self._send(msg)
        self.counters["messages_to_stub"] += 1
        return True

    async def execute(self, method: str, params: list[Any] | None = None, *, timeout: float) -> Message:
        if self._state != "running":
            raise SandboxError(f"component {self.url} is not running ({self._exit_reason or self._state})")
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        params = list(params or [])
        if method == "connect":
            _secret_strings(params, self._secrets)
        body = {"method": method, "params": params}
        return await self._request(
            Message(id=self._new_id(), type="execute", from_=SANDBOX_EXTERNAL, to=self.url, body=body), timeout
        )

    async def remove(self, grace: float = 2.0) -> None:
        if self._state == "exited":
            return
        if self._state == "removing":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), grace + _TERM_WAIT + _KILL_WAIT)
            return
        polite = self._state in ("running", "ready") and self._transport is not None
        was_running = self._state == "running"
        self._state = "removing"
        deadline = self._loop.time() + max(grace, 0.0)
        try:
            if polite:
                if was_running:
                    await self._try_request(
                        Message(
                            id=self._new_id(),
                            type="execute",
                            from_=SANDBOX_EXTERNAL,
                            to=self.url,
                            body={"method": "disconnect", "params": []},
                        ),
                        deadline,
                    )
                await self._try_request(control("delete", {"url": self.url}, msg_id=self._new_id()), deadline)
            if not await self._wait_exit(deadline - self._loop.time()):
                self._signal_tree(signal.SIGTERM)
                if not await self._wait_exit(_TERM_WAIT):
                    self._signal_tree(signal.SIGKILL)
                    await self._wait_exit(_KILL_WAIT)
        finally:
            if not self._exited.is_set():
                self._kill_now()

    # -- start and deploy (called by ProcessSandbox) ------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Start the host process and wait until it says ``ready``."""
        sandbox = self._sandbox
        if not self._bwrap:
            self._workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="protofly-stub-", dir=sandbox.workdir_root)
        parent, child = socket.socketpair()
        try:
            self._proc = self._spawn(child.fileno())
        except OSError as exc:
            parent.close()
            if self._workdir is not None:
                self._sandbox._own(asyncio.to_thread(shutil.rmtree, self._workdir, True))
            raise SandboxError(f"cannot start the sandbox host: {exc}") from None
        finally:
            child.close()
        _LIVE.add(self)
        self.pid = self._proc.pid
        self._log = _log.bind(sandbox_pid=self.pid)
        self._output_log = self._output_log.bind(sandbox_pid=self.pid)
        try:
            self._watch_exit()
            await self._loop.connect_read_pipe(lambda: _Lines(self, "stdout"), self._proc.stdout)
            await self._loop.connect_read_pipe(lambda: _Lines(self, "stderr"), self._proc.stderr)
            await self._loop.connect_accepted_socket(lambda: _Channel(self), parent)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException as exc:
            self._kill_now()
            if isinstance(exc, TimeoutError):
                raise SandboxError(f"the sandbox host did not start within {timeout} s{self._stderr_tail()}") from None
            raise
        self._state = "ready"

    def _spawn(self, fd: int) -> subprocess.Popen[bytes]:
        """Fork and exec the host.

        Deliberately on the event loop's thread, as asyncio's own subprocess support does:
        PR_SET_PDEATHSIG and bwrap's --die-with-parent fire when the *thread* that forked exits, and the
        loop's thread lives as long as the runtime, unlike an executor's worker.  The fork is a vfork.
        """
        sandbox = self._sandbox
        settings = {
            "fd": fd,
            "max_frame": sandbox.max_frame,
            "parent_pid": None if self._bwrap else os.getpid(),
            "read_paths": iso.read_paths(),
            "write_paths": ["/tmp"] if self._bwrap else [self._workdir],
            "landlock": sandbox.landlock,
            "seccomp": sandbox.seccomp,
            "preload": list(sandbox.preload),
        }
        args = ["-m", "protofly.sandbox.host", msgspec.json.encode(settings).decode()]
        if self._probe.bwrap is not None:
            command = iso.bwrap_command(self._probe.bwrap, self._probe.namespaces, sandbox.python, args)
            env: dict[str, str] = {}
            cwd = "/"
        else:
            assert self._workdir is not None
            command = [sandbox.python, "-I", *args]
            env = iso.host_env(self._workdir)
            cwd = self._workdir
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
            start_new_session=True,
            env=env,
            cwd=cwd,
        )

    async def deploy(
        self,
        *,
        url: str,
        source: str,
        config: dict[str, Any],
        classname: str | None,
        limits: Limits,
        boundary: Boundary,
        on_message: Callable[[Message], None],
        on_exit: Callable[[str], None],
        timeout: float,
    ) -> None:
        self.url = url
        self._status_url = f"{url}/status"
        self._guard = Guard(url, boundary, on_message, self.counters)
        self._on_exit = on_exit
        self._log = _log.bind(stub_url=url, sandbox_pid=self.pid)
        self._output_log = get_logger("protofly.sandbox.stub", stub_url=url)
        self._state = "deploying"
        body: dict[str, Any] = {"url": url, "sourceCode": source, "config": config, "sandbox": limits.as_dict()}
        if classname:
            body["sourceCodeClassname"] = classname
        try:
            reply = await self._request(control("create", body, msg_id=self._new_id()), timeout)
        except TimeoutError:
            raise DeployError(f"TimeoutError: the stub did not finish deploying within {timeout} s") from None
        except SandboxError:
            await self._wait_exit(1.0)
            reason = self._exit_reason or "its channel closed"
            raise DeployError(f"the sandbox process ended during deploy: {reason}{self._stderr_tail()}") from None
        if response_code(reply) != 200:
            raise DeployError(error_description(reply.body) or f"deploy failed with code {response_code(reply)}")
        self.isolation = self._isolation_record()
        if self.isolation["missing"]:
            self._log.warning("stub deployed with isolation layers missing", missing=self.isolation["missing"])
        if self._state == "exited":  # it died between its answer and now: deployed, then failed
            self._loop.call_soon(self._report_failure, self._exit_reason or "unknown")
        else:
            self._state = "running"

    def _isolation_record(self) -> dict[str, Any]:
        """Layers only at the top level (a truthy value means active), details inside each value."""
        report = self._host_report or {}
        missing = list(self._probe.missing) + list(report.get("missing", ()))
        if self._host_report is None:
            missing.append("confinement: the host sent no isolation report")
        bwrap: dict[str, Any] | bool = False
        if self._bwrap:
            bwrap = {
                "namespaces": self._probe.namespace_names,
                "network": "shared",
                "filesystem": "read-only binds of /usr, the interpreter and protofly; private tmpfs /tmp",
            }
        return {
            "process": True,
            "bwrap": bwrap,
            "env": "scrubbed",
            "workdir": "/tmp (private tmpfs)" if self._bwrap else self._workdir,
            "die_with_parent": "bwrap --die-with-parent" if self._bwrap else "PR_SET_PDEATHSIG",
            "rlimits": report.get("rlimits", False),
            "no_new_privs": report.get("no_new_privs", False),
            "capabilities": report.get("capabilities", False),
            "landlock": report.get("landlock", False),
            "seccomp": report.get("seccomp", False),
            "missing": missing,
        }

    # -- channel ------------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, msg: Message) -> None:
        try:
            self._encoder.add(msg)
        except (TypeError, msgspec.EncodeError):
            raise MessageError("body: not JSON-serialisable") from None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._encoder.flush()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    async def _request(self, msg: Message, timeout: float) -> Message:
        if self._transport is None:
            raise SandboxError(f"the sandbox channel is closed ({self._exit_reason or self._state})")
        future: asyncio.Future[Message] = self._loop.create_future()
        self._waiters[msg.id] = future  # type: ignore[index]
        try:
            self._send(msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(msg.id, None)  # type: ignore[arg-type]

    async def _try_request(self, msg: Message, deadline: float) -> None:
        remaining = deadline - self._loop.time()
        if remaining <= 0 or self._transport is None:
            return
        with contextlib.suppress(TimeoutError, SandboxError, MessageError):
            await self._request(msg, remaining)

    def _on_data(self, data: bytes) -> None:
        guard = self._guard
        for event in self._decoder.feed(data):
            if type(event) is FrameError:
                if guard is not None:
                    guard.frame_error(event)
                else:
                    self._log.warning("dropped a frame from a sandbox host", kind=event.kind, size=event.size)
            elif event.to == SANDBOX_EXTERNAL:  # type: ignore[union-attr]
                self._on_control(event)  # type: ignore[arg-type]
            elif guard is not None:
                if self._secrets and event.to == self._status_url:  # type: ignore[union-attr]
                    self._scrub(event)  # type: ignore[arg-type]
                guard.from_stub(event)  # type: ignore[arg-type]

    def _scrub(self, msg: Message) -> None:
        """Hide connect's credentials in a description the runtime will show or log (status, error answer).

        A stub's exception text may quote what it was given; the body is otherwise passed on untouched.
        """
        body = msg.body
        if body and isinstance(body.get("description"), str):
            body["description"] = self._redact(body["description"])

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _on_control(self, msg: Message) -> None:
        if msg.type == "response":
            if self._secrets:
                self._scrub(msg)
            future = self._waiters.get(msg.id)  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(msg)
            return
        body = msg.body or {}
        value = body.get("value")
        if value == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
        elif value == "isolation" and self._host_report is None and isinstance(body.get("report"), dict):
            self._host_report = body["report"]
        elif value == "failed":
            self._last_words = str(body.get("description") or "failed")

    def _on_channel_lost(self) -> None:
        self._transport = None
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(
                    SandboxError(f"the sandbox channel closed ({self._exit_reason or 'process ending'})")
                )
        if self._state in ("running", "deploying", "ready", "starting"):
            self._loop.call_later(_CHANNEL_GRACE, self._channel_gone)

    def _channel_gone(self) -> None:
        if self._exited.is_set():
            return
        self._last_words = self._last_words or "the sandbox closed its channel"
        self._signal_tree(signal.SIGKILL)

    # -- exit ---------------------------------------------------------------------------------------

    def _watch_exit(self) -> None:
        assert self._proc is not None
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except OSError:
            self._pidfd = None
            self._sandbox._own(self._poll_exit())
            return
        self._loop.add_reader(self._pidfd, self._check_exit)

    async def _poll_exit(self) -> None:
        """Fallback for kernels without pidfd: poll the child every 20 ms."""
        while not self._exited.is_set():
            self._check_exit()
            await asyncio.sleep(0.02)

    def _check_exit(self) -> None:
        proc = self._proc
        if proc is None or self._exited.is_set():
            return
        returncode = proc.poll()
        if returncode is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._exited_with(returncode)

    def _exited_with(self, returncode: int) -> None:
        reason = self._last_words or describe_exit(returncode, bwrap=self._bwrap)
        self._exit_reason = reason
        previous, self._state = self._state, "exited"
        _LIVE.discard(self)
        self._sandbox._host_ended(self)
        self._exited.set()
        if self._transport is not None:
            self._transport.close()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(SandboxError(f"the sandbox process ended: {reason}"))
        if not self._ready.done():
            self._ready.set_exception(
                SandboxError(f"the sandbox host ended before it was ready: {reason}{self._stderr_tail()}")
            )
            self._ready.exception()  # retrieved: start() reports it
        if self._workdir is not None:
            self._sandbox._own(asyncio.to_thread(shutil.rmtree, self._workdir, True))
            self._workdir = None
        if previous == "running":
            self._report_failure(reason)
        else:
            self._log.debug("sandbox host ended", reason=reason, state=previous)

    def _report_failure(self, reason: str) -> None:
        """The process died after deployment: publish the ``failed`` status for it, then ``on_exit`` once."""
        self._log.warning("stub process ended", reason=reason)
        if self._guard is not None:
            self._guard.deliver(failed_status(self.url, reason))
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            try:
                on_exit(reason)
            except Exception:
                self._log.exception("the runtime's on_exit failed")

    async def _wait_exit(self, timeout: float) -> bool:
        if self._exited.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _signal_tree(self, sig: int) -> None:
        """Signal the host and bwrap's helpers (nearest last), then our child's process group."""
        pid = self.pid
        if pid is None or self._exited.is_set():
            return
        for child in reversed(_descendants(pid)):
            _signal_pid(child, sig)
        if sig == signal.SIGKILL or not self._bwrap:
            # Our child is a zombie at worst until reaped, so its pid (and group id) cannot be recycled.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    def _kill_now(self) -> None:
        """SIGKILL everything synchronously (cancellation and exit paths); reaping follows via the pidfd."""
        if self._state != "exited":
            self._state = "removing"
        self._signal_tree(signal.SIGKILL)
        self._check_exit()

    def _reap_at_exit(self) -> None:
        """Interpreter exit: kill and reap without an event loop."""
        self._signal_tree(signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=2.0)

    # -- output -------------------------------------------------------------------------------------

    def _output(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) > _LINE_LIMIT:
            text = text[:_LINE_LIMIT] + " [cut]"
        text = self._redact(text)
        if stream == "stderr":
            self._recent_stderr.append(text)
        if not self._take_token():
            self.counters["log_lines_dropped"] += 1
            if not self._throttled:
                self._throttled = True
                self._log.warning("stub output throttled; lines are dropped and counted", limit_per_s=_LINE_RATE)
            return
        self._throttled = False
        level = "info"
        if stream == "stderr":
            level = _LEVELS.get(text.split(" ", 1)[0], "warning")
        getattr(self._output_log, level)(text, stream=stream)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(_LINE_BURST), self._tokens + (now - self._tokens_at) * _LINE_RATE)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _stderr_tail(self) -> str:
        if not self._recent_stderr:
            return ""
        return "; stderr: " + " | ".join(list(self._recent_stderr)[-5:])


class ProcessSandbox(Sandbox):
    """One OS process per stub (see the module doc).

    ``limits`` apply when a deploy passes none (the caller narrows them with the descriptor's request);
    ``use_bwrap`` None uses bwrap where it works (a missing bwrap is a recorded, logged fact), True
    requires it, False never uses it; ``prestart`` is how many idle hosts to keep started, and ``preload``
    the modules each host imports while idle (e.g. ``websockets.asyncio.client``, which costs a stub
    ~70 ms to import and a host ~5 MB of memory).
    """

    kind = "process"

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        use_bwrap: bool | None = None,
        landlock: bool = True,
        seccomp: bool = True,
        prestart: int = 1,
        preload: tuple[str, ...] | list[str] = (),
        python: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        start_timeout: float = 30.0,
        deploy_timeout: float = 15.0,
        close_grace: float = 1.0,
        workdir_root: str | None = None,
    ) -> None:
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
        if prestart < 0:
            raise ValueError(f"prestart must be 0 or more, got {prestart}")
        self.limits = limits
        self.use_bwrap = use_bwrap
        self.landlock = landlock
        self.seccomp = seccomp
        self.prestart = prestart
        self.preload = tuple(preload)
        self.python = python or sys.executable
        self.max_frame = max_frame
        self.start_timeout = start_timeout
        self.deploy_timeout = deploy_timeout
        self.close_grace = close_grace
        self.workdir_root = workdir_root
        self.probe: iso.Probe | None = None
        self._spares: deque[asyncio.Task[ProcessComponent]] = deque()
        self._components: set[ProcessComponent] = set()
        #: Every host started and not yet reaped (spares, deployed, discarded).
        self._hosts: set[ProcessComponent] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def components(self) -> list[ProcessComponent]:
        """The components deployed and not yet removed or exited."""
        return [c for c in self._components if c.state in ("deploying", "running")]

    @property
    def spare_pids(self) -> list[int]:
        """Process ids of the prestarted hosts ready for the next deploy (one still starting is not listed)."""
        pids = []
        for task in self._spares:
            if task.done() and not task.cancelled() and task.exception() is None:
                pid = task.result().pid
                if pid is not None:
                    pids.append(pid)
        return pids

    async def start(self) -> None:
        """Probe the isolation layers (once) and start the spare hosts; deploy() calls it if needed."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.probe is None:
                self.probe = await iso.probe(self.python, use_bwrap=self.use_bwrap)
        self._refill()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Start the sandbox if needed and wait until its spare hosts are started."""
        await self.start()
        if self._spares:
            await asyncio.wait(list(self._spares), timeout=timeout)

    async def deploy(
        self,
        *,
        url: str,
        source: bytes,
        config: dict[str, Any],
        classname: str | None,
        limits: Limits | None,
        boundary: Boundary,
        on_message: Callable[[Message], None],
        on_exit: Callable[[str], None],
    ) -> ProcessComponent:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        text = _check_deploy_args(url, source, config, classname, boundary, on_message, on_exit)
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits or None, got {type(limits).__name__}")
        effective = limits if limits is not None else self.limits
        if len(text.encode()) + 1024 > self.max_frame:
            raise DeployError(
                f"ValueError: the stub source ({len(source)} bytes) does not fit the {self.max_frame}-byte frame limit"
            )
        await self.start()
        for attempt in (1, 2):
            component = await self._take()
            self._components.add(component)
            try:
                await component.deploy(
                    url=url,
                    source=text,
                    config=config,
                    classname=classname,
                    limits=effective,
                    boundary=boundary,
                    on_message=on_message,
                    on_exit=on_exit,
                    timeout=self.deploy_timeout,
                )
            except BaseException as exc:
                self._components.discard(component)
                await self._reap_failed(component)
                if attempt == 1 and isinstance(exc, DeployError) and component.died_before_stub_code:
                    _log.warning("a sandbox host died before the stub's code ran; retrying on a new one", url=url)
                    continue
                raise
            return component
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reap_failed(self, component: ProcessComponent) -> None:
        """A failed or cancelled deploy leaves nothing worth a grace period: kill now and wait for the reap."""
        component._kill_now()
        reaped = asyncio.ensure_future(component._wait_exit(_KILL_WAIT))
        self._own(reaped)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(reaped)  # unless we are cancelled, return with the host reaped

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            spares = list(self._spares)
            self._spares.clear()
            for task in spares:
                task.cancel()
            removals = [c.remove(self.close_grace) for c in self._components]
            removals += [self._remove_spare(task) for task in spares]
            await asyncio.gather(*removals, return_exceptions=True)
            self._components.clear()
        # Whatever else was started (spares cancelled while starting, discarded deploys) is killed already;
        # wait until every one of them is reaped, so that close() leaves no process behind.
        for host in list(self._hosts):
            if host.state != "exited":
                host._kill_now()
        waits = [asyncio.ensure_future(host._wait_exit(_KILL_WAIT)) for host in list(self._hosts)]
        pending = waits + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=_KILL_WAIT)

    # -- spares -------------------------------------------------------------------------------------

    def _refill(self) -> None:
        while len(self._spares) < self.prestart and not self._closed:
            task = asyncio.get_running_loop().create_task(self._new_host())
            task.add_done_callback(_log_spare_failure)
            self._spares.append(task)

    async def _new_host(self) -> ProcessComponent:
        assert self.probe is not None
        component = ProcessComponent(self, self.probe)
        self._hosts.add(component)
        await component.start(self.start_timeout)
        return component

    def _host_ended(self, component: ProcessComponent) -> None:
        self._hosts.discard(component)

    async def _take(self) -> ProcessComponent:
        """A started host: a ready spare if there is one, else the next one starting, else a new one."""
        while self._spares:
            ready = next((t for t in self._spares if t.done()), None)
            task = ready or self._spares[0]
            self._spares.remove(task)
            try:
                await asyncio.wait([task])  # unlike `await task`, a cancelled spare is not our own cancellation
            except asyncio.CancelledError:
                self._spares.appendleft(task)  # still good for the next deploy
                raise
            if task.cancelled() or self._closed:
                raise SandboxError("the sandbox is closed")
            if task.exception() is not None:
                continue  # logged by _log_spare_failure; try the next, or a fresh start below
            component = task.result()
            component._check_exit()  # a spare killed a moment ago may not have been noticed yet
            if component.state == "ready":
                self._refill()
                return component
        try:
            component = await self._new_host()
        except SandboxError as exc:
            raise DeployError(str(exc)) from None
        self._refill()
        return component

    async def _remove_spare(self, task: asyncio.Task[ProcessComponent]) -> None:
        await asyncio.wait([task], timeout=self.start_timeout)
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().remove(self.close_grace)

    def _own(self, awaitable: Any) -> None:
        """Run a clean-up task the sandbox owns (close() waits for it)."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _log_spare_failure(task: asyncio.Task[ProcessComponent]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.warning("a pre-started sandbox host failed", error=str(task.exception()))


def _check_deploy_args(
    url: Any,
    source: Any,
    config: Any,
    classname: Any,
    boundary: Any,
    on_message: Any,
    on_exit: Any,
) -> str:
    """Validate what deploy() was given; the stub's own problems are DeployErrors, the caller's TypeErrors."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"url must be a non-empty string, got {url!r}")
    if not isinstance(boundary, Boundary):
        raise TypeError(f"boundary must be a Boundary, got {type(boundary).__name__}")
    if not callable(on_message) or not callable(on_exit):
        raise TypeError("on_message and on_exit must be callable")
    if not isinstance(source, bytes | bytearray | memoryview):
        raise TypeError(f"source must be bytes, got {type(source).__name__}")
    if not isinstance(config, dict):
        raise DeployError(f"TypeError: config must be an object, got {type(config).__name__}")
    if classname is not None and not isinstance(classname, str):
        raise DeployError(f"TypeError: sourceCodeClassname must be a string, got {type(classname).__name__}")
    try:
        msgspec.json.encode(config)
    except (TypeError, msgspec.EncodeError) as exc:
        raise DeployError(f"TypeError: config is not JSON-serialisable ({exc})") from None
    try:
        return bytes(source).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeployError(
            f"UnicodeDecodeError: stub source is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


@atexit.register
def _reap_leftovers() -> None:
    for component in list(_LIVE):
        component._reap_at_exit()
