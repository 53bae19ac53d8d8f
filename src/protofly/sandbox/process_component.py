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
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from protofly.log import get_logger
from protofly.message import Message, MessageError, error_description, response, response_code
from protofly.sandbox import Boundary, Component, DeployError, Limits, SandboxError
from protofly.sandbox import isolation as iso
from protofly.sandbox.broker import NO_EGRESS, EgressBroker, EgressPolicy
from protofly.sandbox.cgroup import CgroupError, CgroupTree, StubCgroup
from protofly.sandbox.channel import (
    LIVENESS,
    SANDBOX_EXTERNAL,
    SANDBOX_INTERNAL,
    FrameDecoder,
    FrameEncoder,
    FrameError,
    control,
)
from protofly.sandbox.egress_channel import EgressChannel
from protofly.sandbox.fdpass import drain_acks, node_socket_pair, send_node_handle, send_socket, socket_pair
from protofly.sandbox.guard import Guard, failed_status, new_counters
from protofly.sandbox.output import StubOutput
from protofly.sandbox.proctree import HostProcess, descendants, describe_exit
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
    #: The runtime's limits: a spare's cgroup has them until a deploy narrows them to the stub's.
    limits: Limits
    #: Size of the private /tmp (bwrap ``--size``).
    tmp_mb: int = 64
    #: The runtime's cgroup tree (None: no cgroup layer, ``cgroup_missing`` says why).
    cgroups: CgroupTree | None = None
    cgroup_missing: str | None = None
    #: Why hosts run with the runtime's root ids (None: they do not).
    user_missing: str | None = None
    #: A JavaScript stub's host: confined, then Node.js (see :mod:`~protofly.sandbox.node_exec`).
    node_spare: bool = False
    #: The sandbox's memory limit, from which a Node host's V8 heap limit is set at its start.
    memory_mb: int | None = None


#: Bytes read from a stub's channel per event-loop callback.  asyncio reads up to 256 KiB at once, about
#: 2,000 small messages checked in one go; a stub that floods would then hold the loop for milliseconds
#: while other stubs' messages wait.  16 KiB keeps each turn short at a negligible cost per byte.
READ_CHUNK = 16 * 1024
#: Messages from one stub handled per event-loop turn (the rest wait for the next turn, the channel paused).
EVENTS_PER_TURN = 256


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
        self.counters.update(bytes_to_stub=0, bytes_from_stub=0)  # the channel's bytes, both ways (metrics)
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
        #: Set by :meth:`kill_unresponsive`: the exit is then reported as ``unresponsive: <detail>``.
        self._unresponsive: str | None = None
        self._guard: Guard | None = None
        self._on_exit: Callable[[str], None] | None = None
        self._workdir: str | None = None
        self._output = StubOutput(self.counters)
        self._log = _log
        #: The runtime's end of the socket-passing pair, and what the stub may connect to.
        self._net: socket.socket | None = None
        self._broker: EgressBroker | None = None
        self._egress: EgressChannel | None = None
        #: Messages read from the stub and not handled yet (a big batch frame is handled over several turns).
        self._backlog: deque[Message | FrameError] = deque()
        self._backlog_scheduled = False
        self._cgroup: StubCgroup | None = None
        self._limit_hit: str | None = None
        self._cleanup: asyncio.Task[None] | None = None
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
        await self.wait_cleanup()

    # -- liveness (the runtime's ping; the host answers from the stub's event loop) ------------------

    async def ping(self, timeout: float) -> dict[str, Any] | None:
        if self._state != "running":
            raise SandboxError(f"component {self.url} is not running ({self._exit_reason or self._state})")
        reply = await self._request(control("read", {"resource": LIVENESS}, msg_id=self._new_id()), timeout)
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
        cleanup = self._cleanup
        if cleanup is not None:
            await asyncio.wait([cleanup], timeout=KILL_WAIT + 1.0)

    @property
    def cgroup(self) -> StubCgroup | None:
        """The host's control group (None: the machine offers none, see ``isolation["missing"]``)."""
        return self._cgroup

    def usage(self) -> dict[str, Any] | None:
        """What the stub's cgroup accounts for now: memory (current, peak), CPU seconds, processes."""
        if self._cgroup is None or self._state == "exited":
            return None
        return self._cgroup.usage().as_dict()

    def check_limits(self) -> str | None:
        """A limit the kernel says the tree hit since the deploy: the reason, after killing the whole tree.

        Hitting a cgroup limit is a failure of the stub (the kernel already refused a fork or OOM-killed a
        process of it); it is counted, the tree is killed, and the exit reports the reason.
        """
        if self._cgroup is None or self._state not in ("running", "deploying") or self._limit_hit:
            return self._limit_hit
        reason = self._limit_reason()
        if reason is not None:
            self._log.warning("stub hit a cgroup limit; killing its process tree", reason=reason)
            self._cgroup.kill()
            self._signal_tree(signal.SIGKILL)  # still "running": the exit is reported as the stub's failure
        return reason

    def _limit_reason(self) -> str | None:
        """A limit hit since the deploy (the first one found is counted, once), or None."""
        if self._limit_hit is None and self._cgroup is not None:
            hit = self._cgroup.hit()
            if hit is not None:
                self._limit_hit = hit.reason
                self.counters[hit.counter] = self.counters.get(hit.counter, 0) + 1
        return self._limit_hit

    def poll_exit(self) -> None:
        """Notice an exit now rather than when the event loop next looks at the pidfd."""
        if self._process is not None:
            self._process.poll()

    async def start(self, timeout: float) -> None:
        """Start the host process in its own cgroup and wait until it says ``ready``."""
        settings = self._settings
        if settings.cgroups is not None:
            try:
                self._cgroup = settings.cgroups.new_group(settings.limits.memory_mb << 20, settings.limits.processes)
            except CgroupError as exc:
                raise SandboxError(f"cannot start the sandbox host: {exc}") from None
        if not self._bwrap:
            self._workdir = await asyncio.to_thread(_make_workdir, settings.workdir_root, self._probe.user)
        parent, child = socket.socketpair()
        self._net, net_child = node_socket_pair() if settings.node_spare else socket_pair()
        if settings.node_spare:  # Node acknowledges each socket it gets on its IPC channel: read and dropped
            self._loop.add_reader(self._net.fileno(), self._drain_node_acks)
        gate, opener = os.pipe()
        try:
            self._process = self._spawn(child.fileno(), net_child.fileno(), gate)
        except OSError as exc:
            parent.close()
            self._close_net()
            os.close(opener)
            self._remove_workdir()
            self._remove_cgroup()
            raise SandboxError(f"cannot start the sandbox host: {exc}") from None
        finally:
            child.close()
            net_child.close()
            os.close(gate)
        process = self._process
        self.pid = process.pid
        try:
            if self._cgroup is not None:
                # A migration waits for an RCU grace period (milliseconds per process and hierarchy): in a
                # thread, so that a deploy running meanwhile on the loop does not wait for a spare's start.
                await asyncio.to_thread(self._cgroup.place_tree, process.pid, descendants)
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
            await self._loop.connect_accepted_socket(lambda: _Channel(self), parent)
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except BaseException as exc:
            self.kill_now()
            if isinstance(exc, TimeoutError):
                tail = self._output.stderr_tail()
                raise SandboxError(f"the sandbox host did not start within {timeout} s{tail}") from None
            raise
        self._state = "ready"

    def _spawn(self, fd: int, egress_fd: int, gate: int) -> HostProcess:
        settings = self._settings
        host_settings: dict[str, Any] = {
            "fd": fd,
            "egress_fd": egress_fd,
            "max_frame": settings.max_frame,
            "parent_pid": None if self._bwrap else os.getpid(),
            "read_paths": iso.read_paths(),
            "write_paths": ["/tmp"] if self._bwrap else [self._workdir],
            "landlock": settings.landlock,
            "seccomp": settings.seccomp,
            "preload": list(settings.preload),
            **_javascript_settings(settings),
        }
        if not self._bwrap:
            host_settings["gate_fd"] = gate
        if self._probe.host_drops is not None:
            host_settings["user"] = list(self._probe.host_drops)
        args = ["-m", "protofly.sandbox.host", msgspec.json.encode(host_settings).decode()]
        if self._probe.bwrap is not None:
            command = iso.bwrap_command(
                self._probe.bwrap,
                self._namespaces(),
                settings.python,
                args,
                containment=iso.containment_options(self._probe, block_fd=gate),
                tmp_bytes=settings.tmp_mb << 20,
            )
            env: dict[str, str] = {}
            cwd = "/"
        else:
            assert self._workdir is not None
            command = [settings.python, "-I", *args]
            env = iso.host_env(self._workdir)
            cwd = self._workdir
        return HostProcess(
            command,
            env=env,
            cwd=cwd,
            pass_fds=(fd, egress_fd, gate),
            bwrap=self._bwrap,
            user=self._probe.spawn_user,
            tasks=self._tasks,
            on_exit=self._exited_with,
        )

    def _namespaces(self) -> tuple[str, ...]:
        """The probe's namespaces, the network one included for Python and Node hosts alike."""
        return self._probe.namespaces

    @property
    def _own_network(self) -> bool:
        return self._bwrap and "--unshare-net" in self._namespaces()

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
        self._broker = EgressBroker(egress, self.counters, stub_url=url)
        if self._net is not None:
            self._egress = EgressChannel(
                self._broker,
                self._net,
                self._tasks,
                self._answer,
                lambda: self._state in ("running", "deploying"),
                send=send_node_handle if self._settings.node_spare else send_socket,
            )
        self._status_url = f"{url}/status"
        self._guard = Guard(url, boundary, on_message, self.counters)
        self._on_exit = on_exit
        self._log = _log.bind(stub_url=url, sandbox_pid=self.pid)
        self._output.bind(stub_url=url, sandbox_pid=self.pid)
        self._state = "deploying"
        started = time.perf_counter()
        if self._cgroup is not None:
            try:  # the stub's own limits, before any of its code runs
                self._cgroup.set_limits(limits.memory_mb << 20, limits.processes)
                self._cgroup.arm()
            except CgroupError as exc:
                raise DeployError(f"the sandbox could not limit the stub's cgroup: {exc}") from None
        limited = time.perf_counter()
        body: dict[str, Any] = {"url": url, "sourceCode": source, "config": config, "sandbox": limits.as_dict()}
        if classname:
            body["sourceCodeClassname"] = classname
        if self._settings.node_spare:
            await asyncio.to_thread(self._limit_node, limits)  # as the sandbox user, it runs a tool
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
        self._parts = {
            "host": round(waited * 1000, 3),
            **_deploy_parts(limited - started, time.perf_counter() - limited, reply),
        }
        self.isolation = self._isolation_record()
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

    def _isolation_record(self) -> dict[str, Any]:
        """Layers only at the top level (a truthy value means active), details inside each value."""
        report = self._host_report or {}
        missing = list(self._probe.missing) + list(report.get("missing", ()))
        settings = self._settings
        missing += [reason for reason in (settings.cgroup_missing, settings.user_missing) if reason]
        if self._host_report is None:
            missing.append("confinement: the host sent no isolation report")
        bwrap: dict[str, Any] | bool = False
        if self._bwrap:
            bwrap = {
                "namespaces": iso.namespace_names(self._namespaces()),
                "network": "own namespace, loopback only" if self._own_network else "shared",
                "filesystem": "read-only binds of /usr, the interpreter and protofly; "
                f"private tmpfs /tmp of {self._settings.tmp_mb} MiB",
                "nested_user_namespaces": not self._probe.userns_locked,
            }
        network = self._network_layer(missing)
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
            "network": network,
            "cgroup": self._cgroup.report() if self._cgroup is not None else False,
            "user": self._user_record(),
            "missing": missing,
        }

    def _network_layer(self, missing: list[str]) -> dict[str, Any] | bool:
        """The network layer: an empty namespace plus the brokered ``egress``, or a ``missing`` entry."""
        declared = self._broker.policy.declared() if self._broker is not None else []
        if self._own_network:
            return {"namespace": "own, no interface but loopback", "egress": declared}
        if not any(item.startswith("network namespace:") for item in missing):
            missing.append("network namespace: none without bwrap; the stub shares the host's network")
        return False

    def _user_record(self) -> dict[str, Any] | bool:
        """Who the stub is: inside its user namespace and on the host (False: the runtime's root)."""
        probe = self._probe
        if probe.user is None and os.geteuid() == 0:
            return False
        host_uid = probe.user[0] if probe.user is not None else os.getuid()
        inside = iso.SANDBOX_UID if self._bwrap and probe.user_namespace else host_uid
        return {"host_uid": host_uid, "uid": inside}

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
            self.counters["bytes_to_stub"] += len(data)

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
        self.counters["bytes_from_stub"] += len(data)
        events = self._decoder.feed(data)
        if len(events) <= EVENTS_PER_TURN and not self._backlog:
            self._handle(events)
            return
        # One frame may be a batch of thousands (a flooding stub): handle them a turn at a time, and read
        # nothing more from this stub until they are done, so other stubs' messages wait one turn at most.
        self._backlog.extend(events)
        if not self._backlog_scheduled:
            self._backlog_scheduled = True
            if self._transport is not None:
                self._transport.pause_reading()
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        backlog = self._backlog
        self._handle([backlog.popleft() for _ in range(min(len(backlog), EVENTS_PER_TURN))])
        if backlog:
            self._loop.call_soon(self._next_turn)
            return
        self._backlog_scheduled = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _handle(self, events: list[Message | FrameError]) -> None:
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
        if msg.type == "execute":  # the host asks for the stub's network (open-connection)
            self._on_execute(msg)
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

    # -- egress -------------------------------------------------------------------------------------

    def _on_execute(self, msg: Message) -> None:
        """A request from the host: ``open-connection`` (the stub's network) is the only one."""
        if self._egress is None or self._state not in ("running", "deploying"):
            self._answer(msg, 409, "egress: no stub is deployed in this sandbox")
            return
        self._egress.handle(msg)

    def _answer(self, request: Message, code: int, description: str | None = None) -> None:
        with contextlib.suppress(MessageError):
            self._send(response(request, code, description))

    def _close_net(self) -> None:
        net, self._net = self._net, None
        if net is not None:
            if self._settings.node_spare:
                self._loop.remove_reader(net.fileno())
            net.close()

    def _drain_node_acks(self) -> None:
        """Read (and drop) a Node host's handle ACKs; a NACK, a socket Node could not take, is logged."""
        net = self._net
        if net is None:
            return
        still_open, nacks = drain_acks(net)
        if nacks:
            self._log.warning("the Node host could not take a socket passed to it", nacks=nacks)
        if not still_open:
            self._loop.remove_reader(net.fileno())

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
        limit = self._limit_reason() if self._state in ("running", "deploying", "removing") else None
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
        self._close_net()
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
        self._remove_cgroup()
        if previous == "running":
            self._report_failure(reason)
        else:
            self._log.debug("sandbox host ended", reason=reason, state=previous)

    def _remove_cgroup(self) -> None:
        """Kill whatever of the tree is left (a child the host left behind), then remove the group."""
        group = self._cgroup
        if group is not None and self._cleanup is None:
            try:
                self._cleanup = self._tasks.spawn(self._remove_group(group), name="remove stub cgroup", shared=True)
            except RuntimeError:  # the sandbox is closed already: kill now, the group is removed with the tree's
                group.kill()

    async def _remove_group(self, group: StubCgroup) -> None:
        try:
            left = await asyncio.to_thread(group.remove)
        except CgroupError as exc:
            self._log.error("stub cgroup not removed", error=str(exc))
            return
        if left:  # usually bwrap's helpers still exiting; a stub's orphan shows up here too
            self._log.debug("killed what was left in the stub's cgroup", count=len(left))

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


def _deploy_parts(limits: float, create: float, reply: Message) -> dict[str, float]:
    """The deploy's parts in ms; the host's own figures are taken only if they are sane numbers (the stub
    shares the host's process, so they are shown, never acted on)."""
    parts = {"limits": round(limits * 1000, 3)}
    value = (reply.body or {}).get("value")
    told = value.get("ms") if isinstance(value, dict) else None
    host = {}
    if isinstance(told, dict):
        for name in ("confine", "load"):
            ms = told.get(name)
            if isinstance(ms, int | float) and not isinstance(ms, bool) and 0 <= ms <= create * 1000:
                host[name] = float(ms)
    parts.update(host)
    parts["channel"] = round(max(create * 1000 - sum(host.values()), 0.0), 3)
    return parts


def _make_workdir(root: str | None, user: tuple[int, int] | None) -> str:
    """The private working directory of a host run without bwrap, owned by the user it runs as."""
    path = tempfile.mkdtemp(prefix="protofly-stub-", dir=root)
    if user is not None:
        os.chown(path, user[0], user[1])
    return path


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
