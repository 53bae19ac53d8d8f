"""ProcessComponent: one sandbox host process, first a started spare, then the stub deployed into it.

It decides what comes over the host's channel (:mod:`~protofly.sandbox.host_channel` carries the
frames): the control requests (``create``, ``execute``, ``delete``) and their answers, the stub's
messages after the boundary checks (:mod:`~protofly.sandbox.guard`), and the component's life cycle
(``starting`` → ``ready`` → ``deploying`` → ``running`` → ``removing`` → ``exited``).  The process tree
and its reaping are :class:`~protofly.sandbox.proctree.HostProcess`'s; the stub's output log is
:class:`~protofly.sandbox.output.StubOutput`'s; the host's command line is
:mod:`~protofly.sandbox.host_spawn`'s, its isolation record :mod:`~protofly.sandbox.isolation_record`'s, its
network :mod:`~protofly.sandbox.host_network`'s and its cgroup :mod:`~protofly.sandbox.host_cgroup`'s.

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
import time
from collections.abc import Callable
from typing import Any

from protofly.log import get_logger
from protofly.message import Message, MessageError, error_description, response, response_code
from protofly.sandbox import Boundary, Component, DeployError, Limits, SandboxError
from protofly.sandbox import isolation as iso
from protofly.sandbox.broker import NO_EGRESS, EgressBroker, EgressPolicy
from protofly.sandbox.cgroup import StubCgroup
from protofly.sandbox.channel import LIVENESS, SANDBOX_EXTERNAL, SANDBOX_INTERNAL, FrameError, control
from protofly.sandbox.deploy_parts import sandbox_parts
from protofly.sandbox.guard import Guard, failed_status, new_counters
from protofly.sandbox.host_cgroup import HostCgroup
from protofly.sandbox.host_channel import Events, HostChannel
from protofly.sandbox.host_network import HostNetwork
from protofly.sandbox.host_spawn import HostSettings, host_command, make_workdir
from protofly.sandbox.isolation_record import isolation_record
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
        self.counters.update(bytes_to_stub=0, bytes_from_stub=0)  # the channel's bytes, both ways (metrics)
        self._settings = settings
        self._probe = probe
        self._tasks = tasks
        self._on_reaped = on_reaped
        self._bwrap = probe.bwrap is not None
        self._loop = asyncio.get_running_loop()
        self._process: HostProcess | None = None
        self._channel = HostChannel(settings.max_frame, self.counters, self._handle, self._on_channel_lost)
        self._state = "starting"
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._exit_reason: str | None = None
        #: What the host said before it ended: logged, never the recorded reason (the stub's code runs in
        #: that process, so its words are not evidence; the exit status is).
        self._last_words: str | None = None
        #: A reason the runtime side observed itself (the channel closed before the process ended).
        self._observed: str | None = None
        self._host_report: dict[str, Any] | None = None
        #: Set by :meth:`kill_unresponsive`: the exit is then reported as ``unresponsive: <detail>``.
        self._unresponsive: str | None = None
        self._guard: Guard | None = None
        self._on_exit: Callable[[str], None] | None = None
        self._workdir: str | None = None
        self._output = StubOutput(self.counters)
        self._log = _log
        #: The runtime's end of the socket-passing pair, and what the stub may connect to.
        self._network = HostNetwork(node=settings.node_spare, log=lambda: self._log)
        self._cgroup = HostCgroup(self.counters, tasks, lambda: self._log)
        self._parts: dict[str, float] = {}

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
        queued = self._channel.queued_bytes
        if queued < 0 or queued > _HIGH_WATER:  # closed, or the stub does not read
            self.counters["dropped_to_stub"] += 1
            if self.counters["dropped_to_stub"] in (1, 10, 100) or self.counters["dropped_to_stub"] % 10_000 == 0:
                self._log.warning(
                    "the stub does not read its channel; refusing messages to it",
                    count=self.counters["dropped_to_stub"],
                )
            return False
        self._channel.send(msg)
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
            Message(id=self._channel.new_id(), type="execute", from_=SANDBOX_EXTERNAL, to=self.url, body=body), timeout
        )

    async def remove(self, grace: float = 2.0) -> None:
        if self._state == "exited":
            return
        if self._state == "removing":
            with contextlib.suppress(TimeoutError):
                await self.wait_exit(grace + _TERM_WAIT + KILL_WAIT)
            return
        polite = self._state in ("running", "ready") and self._channel.transport is not None
        was_running = self._state == "running"
        self._state = "removing"
        deadline = self._loop.time() + max(grace, 0.0)
        try:
            if polite:
                if was_running:
                    await self._channel.try_request(
                        Message(
                            id=self._channel.new_id(),
                            type="execute",
                            from_=SANDBOX_EXTERNAL,
                            to=self.url,
                            body={"method": "disconnect", "params": []},
                        ),
                        deadline,
                    )
                await self._channel.try_request(
                    control("delete", {"url": self.url}, msg_id=self._channel.new_id()), deadline
                )
            if not await self.wait_exit(deadline - self._loop.time()):
                self._signal_tree(signal.SIGTERM)
                if not await self.wait_exit(_TERM_WAIT):
                    self._signal_tree(signal.SIGKILL)
                    await self.wait_exit(KILL_WAIT)
        finally:
            if self._state != "exited":
                self.kill_now()
        await self.wait_cleanup()

    # -- liveness (the runtime's ping; the host answers from the stub's event loop) ------------------

    async def ping(self, timeout: float) -> dict[str, Any] | None:
        if self._state != "running":
            raise SandboxError(f"component {self.url} is not running ({self._exit_reason or self._state})")
        reply = await self._request(control("read", {"resource": LIVENESS}, msg_id=self._channel.new_id()), timeout)
        body = reply.body or {}
        value = body.get("value")
        return value if isinstance(value, dict) else {}

    def kill_unresponsive(self, detail: str) -> None:
        if self._state == "exited":
            return
        self._unresponsive = detail
        self._log.warning("stub unresponsive: killing it", detail=detail)
        self._signal_tree(signal.SIGKILL)

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

    async def wait_cleanup(self) -> None:
        """Wait until the host's cgroup is empty and removed (no process of the stub's tree is left)."""
        await self._cgroup.wait_removed(KILL_WAIT + 1.0)

    @property
    def cgroup(self) -> StubCgroup | None:
        """The host's control group (None: the machine offers none, see ``isolation["missing"]``)."""
        return self._cgroup.group

    def usage(self) -> dict[str, Any] | None:
        """What the stub's cgroup accounts for now: memory (current, peak), CPU seconds, processes."""
        return None if self._state == "exited" else self._cgroup.usage()

    def check_limits(self) -> str | None:
        """A limit the kernel says the tree hit since the deploy: the reason, after killing the whole tree.

        Hitting a cgroup limit is a failure of the stub (the kernel already refused a fork or OOM-killed a
        process of it); it is counted, the tree is killed, and the exit reports the reason.
        """
        cgroup = self._cgroup
        if cgroup.group is None or self._state not in ("running", "deploying") or cgroup.limit_hit:
            return cgroup.limit_hit
        reason = cgroup.hit()
        if reason is not None:
            self._log.warning("stub hit a cgroup limit; killing its process tree", reason=reason)
            cgroup.kill()
            self._signal_tree(signal.SIGKILL)  # still "running": the exit is reported as the stub's failure
        return reason

    def poll_exit(self) -> None:
        """Notice an exit now rather than when the event loop next looks at the pidfd."""
        if self._process is not None:
            self._process.poll()

    async def start(self, timeout: float) -> None:
        """Start the host process in its own cgroup and wait until it says ``ready``."""
        settings = self._settings
        self._cgroup.create(settings.cgroups, settings.limits)
        if not self._bwrap:
            self._workdir = await asyncio.to_thread(make_workdir, settings.workdir_root, self._probe.user)
        parent, child = socket.socketpair()
        net_child = self._network.open()
        gate, opener = os.pipe()
        try:
            self._process = self._spawn(child.fileno(), net_child.fileno(), gate)
        except OSError as exc:
            parent.close()
            self._network.close()
            os.close(opener)
            self._remove_workdir()
            self._cgroup.remove()
            raise SandboxError(f"cannot start the sandbox host: {exc}") from None
        finally:
            child.close()
            net_child.close()
            os.close(gate)
        process = self._process
        self.pid = process.pid
        try:
            await self._cgroup.place(process.pid)
            os.write(opener, b"g")  # the host may run now: everything it does is charged to its cgroup
        except BaseException as exc:
            self.kill_now()
            if isinstance(exc, OSError):
                raise SandboxError(f"cannot place the sandbox host in its cgroup: {exc}") from None
            raise
        finally:
            os.close(opener)
        self._log = _log.bind(sandbox_pid=self.pid)
        self._output.bind(sandbox_pid=self.pid)
        try:
            await self._loop.connect_read_pipe(lambda: self._output.reader("stdout"), process.popen.stdout)
            await self._loop.connect_read_pipe(lambda: self._output.reader("stderr"), process.popen.stderr)
            await self._loop.connect_accepted_socket(lambda: self._channel, parent)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException as exc:
            self.kill_now()
            if isinstance(exc, TimeoutError):
                tail = self._output.stderr_tail()
                raise SandboxError(f"the sandbox host did not start within {timeout} s{tail}") from None
            raise
        self._state = "ready"

    def _spawn(self, fd: int, egress_fd: int, gate: int) -> HostProcess:
        command = host_command(
            self._settings, self._probe, fd=fd, egress_fd=egress_fd, gate=gate, workdir=self._workdir
        )
        return HostProcess(
            command.argv,
            env=command.env,
            cwd=command.cwd,
            pass_fds=(fd, egress_fd, gate),
            bwrap=self._bwrap,
            user=self._probe.spawn_user,
            tasks=self._tasks,
            on_exit=self._exited_with,
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
        egress: EgressPolicy = NO_EGRESS,
        waited: float = 0.0,
    ) -> None:
        """Run the stub in this started host (``DeployError`` naming the stub's problem if it cannot).

        ``waited`` is how long the deploy waited for this host (seconds; a ready spare: next to nothing).
        """
        self.url = url
        self._network.serve(
            EgressBroker(egress, self.counters, stub_url=url),
            self._tasks,
            self._answer,
            lambda: self._state in ("running", "deploying"),
        )
        self._status_url = f"{url}/status"
        self._guard = Guard(url, boundary, on_message, self.counters)
        self._on_exit = on_exit
        self._log = _log.bind(stub_url=url, sandbox_pid=self.pid)
        self._output.bind(stub_url=url, sandbox_pid=self.pid)
        self._state = "deploying"
        started = time.perf_counter()
        self._cgroup.narrow(limits)  # the stub's own limits, before any of its code runs
        limited = time.perf_counter()
        body: dict[str, Any] = {"url": url, "sourceCode": source, "config": config, "sandbox": limits.as_dict()}
        if classname:
            body["sourceCodeClassname"] = classname
        if self._settings.node_spare:
            await asyncio.to_thread(self._limit_node, limits)  # as the sandbox user, it runs a tool
        try:
            reply = await self._request(control("create", body, msg_id=self._channel.new_id()), timeout)
        except TimeoutError:
            raise DeployError(f"TimeoutError: the stub did not finish deploying within {timeout} s") from None
        except SandboxError:
            await self.wait_exit(1.0)
            reason = self._exit_reason or "its channel closed"
            tail = self._output.stderr_tail()
            raise DeployError(f"the sandbox process ended during deploy: {reason}{tail}") from None
        if response_code(reply) != 200:
            raise DeployError(error_description(reply.body) or f"deploy failed with code {response_code(reply)}")
        self._parts = {
            "host": round(waited * 1000, 3),
            **sandbox_parts(limited - started, time.perf_counter() - limited, reply),
        }
        self.isolation = isolation_record(
            self._settings,
            self._probe,
            host_report=self._host_report,
            cgroup=self._cgroup.group,
            egress=self._network.declared(),
            workdir=self._workdir,
        )
        if self.isolation["missing"]:
            self._log.warning("stub deployed with isolation layers missing", missing=self.isolation["missing"])
        if self._state == "exited":  # it died between its answer and now: deployed, then failed
            self._loop.call_soon(self._report_failure, self._exit_reason or "unknown")
        else:
            self._state = "running"

    def deploy_parts(self) -> dict[str, float]:
        """``host`` (waiting for a started host), ``limits`` (writing the stub's cgroup limits), ``confine``
        and ``load`` (as the host measured its confinement and the stub's code start) and ``channel`` (the
        rest of the ``create`` round trip)."""
        return dict(self._parts)

    def _limit_node(self, limits: Limits) -> None:
        """Node has no setrlimit: apply the stub's limits from here; the host reports what is in force."""
        from protofly.sandbox.node import host_pid
        from protofly.sandbox.node_exec import apply_rlimits

        pid = host_pid(self.pid) if self.pid is not None else None
        try:
            if pid is None:
                raise ProcessLookupError("no Node process below the sandbox process")
            apply_rlimits(pid, limits, self._probe.host_drops)
        except (OSError, ValueError, IndexError) as exc:
            self._log.warning("cannot apply the stub's rlimits to its Node host", error=str(exc))

    # -- channel ------------------------------------------------------------------------------------

    async def _request(self, msg: Message, timeout: float) -> Message:
        return await self._channel.request(msg, timeout, self._exit_reason or self._state)

    def _handle(self, events: Events) -> None:
        """What the channel read: control notices, the stub's messages (through the guard), frame errors."""
        guard = self._guard
        for event in events:
            if isinstance(event, FrameError):
                if guard is not None:
                    guard.frame_error(event)
                else:
                    self._log.warning("dropped a frame from a sandbox host", kind=event.kind, size=event.size)
            elif event.to == SANDBOX_EXTERNAL:
                self._on_control(event)
            elif guard is not None:
                if event.to == self._status_url and self._output.has_secrets:
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
            self._channel.answered(msg)
            return
        if msg.from_ != SANDBOX_INTERNAL:
            # The host reports only from its own control address; anything else sent to the runtime's control
            # side is the stub writing there: counted, without effect.  (From the host's address the stub
            # cannot be told from the host, as they share the process, which is why nothing said here decides
            # a crash reason: the exit status does.)
            self.counters["forged_control"] = self.counters.get("forged_control", 0) + 1
            return
        if msg.type == "execute":  # the host asks for the stub's network (open-connection)
            self._network.handle(msg, self._answer, self._state in ("running", "deploying"))
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

    def _answer(self, request: Message, code: int, description: str | None = None) -> None:
        with contextlib.suppress(MessageError):
            self._channel.send(response(request, code, description))

    def _on_channel_lost(self) -> None:
        self._channel.fail_waiters(f"the sandbox channel closed ({self._exit_reason or 'process ending'})")
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
        limit = self._cgroup.hit() if self._state in ("running", "deploying", "removing") else None
        reason = limit or describe_exit(returncode, bwrap=self._bwrap)  # the kernel's word, not the stub's
        if limit is None and self._host_report is not None and self._host_report.get("host") == "node":
            reason = _node_exit_reason(reason, self._output.recent_stderr())
        if limit is None and self._observed is not None:
            reason = f"{reason} ({self._observed})"
        if self._unresponsive is not None:
            reason = f"unresponsive: {self._unresponsive} ({reason})"
        if self._last_words is not None:
            self._log.info("the sandbox host's last report before it ended", said=self._last_words, exit=reason)
        self._exit_reason = reason
        previous, self._state = self._state, "exited"
        self._on_reaped(self)
        self._network.close()
        self._channel.close()
        self._channel.fail_waiters(f"the sandbox process ended: {reason}")
        if not self._ready.done():
            tail = self._output.stderr_tail()
            self._ready.set_exception(SandboxError(f"the sandbox host ended before it was ready: {reason}{tail}"))
            self._ready.exception()  # retrieved: start() reports it
        self._remove_workdir()
        self._cgroup.remove()
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


def _node_exit_reason(reason: str, stderr_lines: list[str]) -> str:
    from protofly.sandbox.node import exit_reason

    return exit_reason(reason, stderr_lines)
