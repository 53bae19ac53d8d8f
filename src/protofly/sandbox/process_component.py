"""ProcessComponent: one sandbox host process, first a started spare, then the stub deployed into it.

It owns the host's side of the channel (a socketpair carrying length-prefixed JSON frames, see
:mod:`~protofly.sandbox.channel`): the control requests (``create``, ``execute``, ``delete``) and their
answers, the stub's messages after the boundary checks (:mod:`~protofly.sandbox.guard`), and the
component's life cycle (``starting`` → ``ready`` → ``deploying`` → ``running`` → ``removing`` →
``exited``).  The process tree and its reaping are :class:`~protofly.sandbox.proctree.HostProcess`'s; the
stub's output log is :class:`~protofly.sandbox.output.StubOutput`'s.

Removal goes disconnect → grace → SIGTERM → SIGKILL → reap; a crash is reported as ``failed`` at once,
with ``on_exit`` called once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from protofly.log import get_logger
from protofly.message import Message, MessageError, error_description, response_code
from protofly.sandbox import Boundary, Component, DeployError, Limits, SandboxError
from protofly.sandbox import isolation as iso
from protofly.sandbox.channel import SANDBOX_EXTERNAL, SANDBOX_INTERNAL, FrameDecoder, FrameEncoder, FrameError, control
from protofly.sandbox.guard import Guard, failed_status, new_counters
from protofly.sandbox.output import StubOutput
from protofly.sandbox.proctree import HostProcess, describe_exit
from protofly.tasks import TaskSet

__all__ = ["KILL_WAIT", "HostSettings", "ProcessComponent"]

_log = get_logger("protofly.sandbox")

#: Bytes queued towards a stub beyond which further posts are dropped and counted (the stub is stuck).
_HIGH_WATER = 16 << 20
_TERM_WAIT = 1.0
#: How long a SIGKILLed host may take to be reaped.
KILL_WAIT = 5.0
#: After the channel closes under a live process, how long to wait for its exit before killing it.
_CHANNEL_GRACE = 0.1


@dataclass(frozen=True, slots=True)
class HostSettings:
    """How the process sandbox starts its hosts (the same for every host it starts)."""

    python: str
    max_frame: int
    landlock: bool
    seccomp: bool
    preload: tuple[str, ...]
    workdir_root: str | None
    #: A JavaScript stub's host: confined, then Node.js (see :mod:`~protofly.sandbox.node_exec`).
    node_spare: bool = False
    #: The sandbox's memory limit, from which a Node host's V8 heap limit is set at its start.
    memory_mb: int | None = None


#: Bytes read from a stub's channel per event-loop callback.  asyncio reads up to 256 KiB at once, about
#: 2,000 small messages checked in one go; a stub that floods would then hold the loop for milliseconds
#: while other stubs' messages wait.  16 KiB keeps each turn short at a negligible cost per byte.
READ_CHUNK = 16 * 1024


class _Channel(asyncio.BufferedProtocol):
    def __init__(self, component: ProcessComponent) -> None:
        self.component = component
        self._view = memoryview(bytearray(READ_CHUNK))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.component._on_data(self._view[:nbytes])  # the decoder copies what it keeps

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.component._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.component._on_channel_lost()


class ProcessComponent(Component):
    """One host process: first a pre-started spare, then the stub deployed into it.

    ``tasks`` owns the clean-up work it starts (workdir removal); ``on_reaped`` is told once the process
    is reaped, whatever state it was in.
    """

    def __init__(
        self,
        settings: HostSettings,
        probe: iso.Probe,
        tasks: TaskSet,
        on_reaped: Callable[[ProcessComponent], None],
    ) -> None:
        self.url = ""
        self._status_url = ""
        self.pid: int | None = None
        self.isolation: dict[str, Any] = {}
        self.counters = new_counters()
        self._settings = settings
        self._probe = probe
        self._tasks = tasks
        self._on_reaped = on_reaped
        self._bwrap = probe.bwrap is not None
        self._loop = asyncio.get_running_loop()
        self._process: HostProcess | None = None
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(settings.max_frame)
        self._encoder = FrameEncoder(settings.max_frame)
        self._flush_scheduled = False
        self._waiters: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._state = "starting"
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._exit_reason: str | None = None
        #: What the host said before it ended: logged, never the recorded reason (the stub's code runs in
        #: that process, so its words are not evidence; the exit status is).
        self._last_words: str | None = None
        #: A reason the runtime side observed itself (the channel closed before the process ended).
        self._observed: str | None = None
        self._host_report: dict[str, Any] | None = None
        self._guard: Guard | None = None
        self._on_exit: Callable[[str], None] | None = None
        self._workdir: str | None = None
        self._output = StubOutput(self.counters)
        self._log = _log

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
            self._output.add_secrets(params)
        body = {"method": method, "params": params}
        return await self._request(
            Message(id=self._new_id(), type="execute", from_=SANDBOX_EXTERNAL, to=self.url, body=body), timeout
        )

    async def remove(self, grace: float = 2.0) -> None:
        if self._state == "exited":
            return
        if self._state == "removing":
            with contextlib.suppress(TimeoutError):
                await self.wait_exit(grace + _TERM_WAIT + KILL_WAIT)
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
            if not await self.wait_exit(deadline - self._loop.time()):
                self._signal_tree(signal.SIGTERM)
                if not await self.wait_exit(_TERM_WAIT):
                    self._signal_tree(signal.SIGKILL)
                    await self.wait_exit(KILL_WAIT)
        finally:
            if self._state != "exited":
                self.kill_now()

    # -- used by ProcessSandbox and its spare pool --------------------------------------------------

    async def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to be reaped; True once it is (or never started)."""
        if self._process is None:
            return True
        return await self._process.wait(timeout)

    def kill_now(self) -> None:
        """SIGKILL everything synchronously (cancellation and exit paths); reaping follows via the pidfd."""
        if self._state != "exited":
            self._state = "removing"
        if self._process is not None:
            self._process.kill()

    def poll_exit(self) -> None:
        """Notice an exit now rather than when the event loop next looks at the pidfd."""
        if self._process is not None:
            self._process.poll()

    async def start(self, timeout: float) -> None:
        """Start the host process and wait until it says ``ready``."""
        if not self._bwrap:
            root = self._settings.workdir_root
            self._workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix="protofly-stub-", dir=root)
        parent, child = socket.socketpair()
        try:
            self._process = self._spawn(child.fileno())
        except OSError as exc:
            parent.close()
            self._remove_workdir()
            raise SandboxError(f"cannot start the sandbox host: {exc}") from None
        finally:
            child.close()
        process = self._process
        self.pid = process.pid
        self._log = _log.bind(sandbox_pid=self.pid)
        self._output.bind(sandbox_pid=self.pid)
        try:
            await self._loop.connect_read_pipe(lambda: self._output.reader("stdout"), process.popen.stdout)
            await self._loop.connect_read_pipe(lambda: self._output.reader("stderr"), process.popen.stderr)
            await self._loop.connect_accepted_socket(lambda: _Channel(self), parent)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException as exc:
            self.kill_now()
            if isinstance(exc, TimeoutError):
                tail = self._output.stderr_tail()
                raise SandboxError(f"the sandbox host did not start within {timeout} s{tail}") from None
            raise
        self._state = "ready"

    def _spawn(self, fd: int) -> HostProcess:
        settings = self._settings
        host_settings = {
            "fd": fd,
            "max_frame": settings.max_frame,
            "parent_pid": None if self._bwrap else os.getpid(),
            "read_paths": iso.read_paths(),
            "write_paths": ["/tmp"] if self._bwrap else [self._workdir],
            "landlock": settings.landlock,
            "seccomp": settings.seccomp,
            "preload": list(settings.preload),
            **_javascript_settings(settings),
        }
        args = ["-m", "protofly.sandbox.host", msgspec.json.encode(host_settings).decode()]
        if self._probe.bwrap is not None:
            command = iso.bwrap_command(self._probe.bwrap, self._probe.namespaces, settings.python, args)
            env: dict[str, str] = {}
            cwd = "/"
        else:
            assert self._workdir is not None
            command = [settings.python, "-I", *args]
            env = iso.host_env(self._workdir)
            cwd = self._workdir
        return HostProcess(
            command, env=env, cwd=cwd, pass_fd=fd, bwrap=self._bwrap, tasks=self._tasks, on_exit=self._exited_with
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
        """Run the stub in this started host (``DeployError`` naming the stub's problem if it cannot)."""
        self.url = url
        self._status_url = f"{url}/status"
        self._guard = Guard(url, boundary, on_message, self.counters)
        self._on_exit = on_exit
        self._log = _log.bind(stub_url=url, sandbox_pid=self.pid)
        self._output.bind(stub_url=url, sandbox_pid=self.pid)
        self._state = "deploying"
        body: dict[str, Any] = {"url": url, "sourceCode": source, "config": config, "sandbox": limits.as_dict()}
        if classname:
            body["sourceCodeClassname"] = classname
        if self._settings.node_spare:
            self._limit_node(limits)
        try:
            reply = await self._request(control("create", body, msg_id=self._new_id()), timeout)
        except TimeoutError:
            raise DeployError(f"TimeoutError: the stub did not finish deploying within {timeout} s") from None
        except SandboxError:
            await self.wait_exit(1.0)
            reason = self._exit_reason or "its channel closed"
            tail = self._output.stderr_tail()
            raise DeployError(f"the sandbox process ended during deploy: {reason}{tail}") from None
        if response_code(reply) != 200:
            raise DeployError(error_description(reply.body) or f"deploy failed with code {response_code(reply)}")
        self.isolation = self._isolation_record()
        if self.isolation["missing"]:
            self._log.warning("stub deployed with isolation layers missing", missing=self.isolation["missing"])
        if self._state == "exited":  # it died between its answer and now: deployed, then failed
            self._loop.call_soon(self._report_failure, self._exit_reason or "unknown")
        else:
            self._state = "running"

    def _limit_node(self, limits: Limits) -> None:
        """Node has no setrlimit: apply the stub's limits from here; the host reports what is in force."""
        from protofly.sandbox.node import host_pid
        from protofly.sandbox.node_exec import apply_rlimits

        pid = host_pid(self.pid) if self.pid is not None else None
        try:
            if pid is None:
                raise ProcessLookupError("no Node process below the sandbox process")
            apply_rlimits(pid, limits)
        except (OSError, ValueError, IndexError) as exc:
            self._log.warning("cannot apply the stub's rlimits to its Node host", error=str(exc))

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
            "host": report.get("host", "python"),
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
        msg_id = msg.id
        assert isinstance(msg_id, int)  # control requests are numbered by _new_id
        future: asyncio.Future[Message] = self._loop.create_future()
        self._waiters[msg_id] = future
        try:
            self._send(msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(msg_id, None)

    async def _try_request(self, msg: Message, deadline: float) -> None:
        remaining = deadline - self._loop.time()
        if remaining <= 0 or self._transport is None:
            return
        with contextlib.suppress(TimeoutError, SandboxError, MessageError):
            await self._request(msg, remaining)

    def _on_data(self, data: bytes | memoryview) -> None:
        guard = self._guard
        for event in self._decoder.feed(data):
            if isinstance(event, FrameError):
                if guard is not None:
                    guard.frame_error(event)
                else:
                    self._log.warning("dropped a frame from a sandbox host", kind=event.kind, size=event.size)
            elif event.to == SANDBOX_EXTERNAL:
                self._on_control(event)
            elif guard is not None:
                if self._output.has_secrets and event.to == self._status_url:
                    self._scrub(event)
                guard.from_stub(event)

    def _scrub(self, msg: Message) -> None:
        """Hide connect's credentials in a description the runtime will show or log (status, error answer).

        A stub's exception text may quote what it was given; the body is otherwise passed on untouched.
        """
        body = msg.body
        if body and isinstance(body.get("description"), str):
            body["description"] = self._output.redact(body["description"])

    def _on_control(self, msg: Message) -> None:
        if msg.type == "response":  # answers a control request of this component's only: its own record
            if self._output.has_secrets:
                self._scrub(msg)
            future = self._waiters.get(msg.id) if isinstance(msg.id, int) else None
            if future is not None and not future.done():
                future.set_result(msg)
            return
        if msg.from_ != SANDBOX_INTERNAL:
            # The host reports only from its own control address; anything else sent to the runtime's control
            # side is the stub writing there: counted, without effect.  (From the host's address the stub
            # cannot be told from the host, as they share the process, which is why nothing said here decides
            # a crash reason: the exit status does.)
            self.counters["forged_control"] = self.counters.get("forged_control", 0) + 1
            return
        body = msg.body or {}
        value = body.get("value")
        if value == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
        elif value == "isolation" and self._host_report is None and isinstance(body.get("report"), dict):
            self._host_report = body["report"]
        elif value == "failed":
            self._last_words = str(body.get("description") or "failed")[:200]

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
        if self._state == "exited":
            return
        self._observed = "the sandbox closed its channel"
        self._signal_tree(signal.SIGKILL)

    # -- exit ---------------------------------------------------------------------------------------

    def _signal_tree(self, sig: int) -> None:
        if self._process is not None:
            self._process.signal_tree(sig)

    def _exited_with(self, returncode: int) -> None:
        """The process was reaped: fail whatever waits on it, clean up, and report a running stub's death."""
        reason = describe_exit(returncode, bwrap=self._bwrap)
        if self._host_report is not None and self._host_report.get("host") == "node":
            reason = _node_exit_reason(reason, self._output.recent_stderr())
        if self._observed is not None:
            reason = f"{reason} ({self._observed})"
        if self._last_words is not None:
            self._log.info("the sandbox host's last report before it ended", said=self._last_words, exit=reason)
        self._exit_reason = reason
        previous, self._state = self._state, "exited"
        self._on_reaped(self)
        if self._transport is not None:
            self._transport.close()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(SandboxError(f"the sandbox process ended: {reason}"))
        if not self._ready.done():
            tail = self._output.stderr_tail()
            self._ready.set_exception(SandboxError(f"the sandbox host ended before it was ready: {reason}{tail}"))
            self._ready.exception()  # retrieved: start() reports it
        self._remove_workdir()
        if previous == "running":
            self._report_failure(reason)
        else:
            self._log.debug("sandbox host ended", reason=reason, state=previous)

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            self._tasks.spawn(asyncio.to_thread(shutil.rmtree, self._workdir, True), name="remove stub workdir")
            self._workdir = None

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


def _javascript_settings(settings: HostSettings) -> dict[str, Any]:
    """What a JavaScript stub's host needs to become Node.js (nothing for a Python stub's host)."""
    if not settings.node_spare:
        return {}
    from protofly.sandbox.node import node_executable, node_modules

    return {
        "node_spare": True,
        "node": node_executable(),
        "node_modules": node_modules(),
        "memory_mb": settings.memory_mb,
    }


def _node_exit_reason(reason: str, stderr_lines: list[str]) -> str:
    from protofly.sandbox.node import exit_reason

    return exit_reason(reason, stderr_lines)
