"""ProcessSandbox: every stub in its own OS process (the default sandbox).

Per stub: a ``python -I -m protofly.sandbox.host`` process (under bubblewrap where it works), its own
session and process group, a scrubbed environment, a private working directory, rlimits, Landlock and
seccomp applied inside before the stub's code runs (see :mod:`~protofly.sandbox.isolation` and
:mod:`~protofly.sandbox.confine`).  The parts, by what each owns:

* :mod:`~protofly.sandbox.process_component`: one host's channel and life cycle (``ProcessComponent``);
* :mod:`~protofly.sandbox.proctree`: its process tree, exit watching and reaping;
* :mod:`~protofly.sandbox.output`: its stdout/stderr log, with the stub's secrets redacted;
* :mod:`~protofly.sandbox.spares`: the hosts started ahead of the deploys (``prestart``);
* :mod:`~protofly.sandbox.cgroup`: each host's control group (its whole tree's memory, processes, CPU).

Every host starts in a cgroup of its own (when the machine offers cgroups), with the runtime's limits; a
deploy narrows them to the stub's before its code runs.  A watcher reads the kernel's limit counters of
the running stubs: a stub whose tree hit its memory or process limit is killed whole and reported
``failed`` with that reason (and the runtime restarts it under its backoff, like any crash).

Isolation stays per stub: every host is its own bwrap sandbox and process, and it applies the stub's own
limits when the stub arrives; a host never serves two stubs.  If the runtime dies, ``bwrap
--die-with-parent`` or ``PR_SET_PDEATHSIG`` takes the stubs with it; at interpreter exit any process
still running is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from protofly.log import get_logger
from protofly.message import Message
from protofly.sandbox import (
    DEFAULT_LIMITS,
    Boundary,
    DeployError,
    Limits,
    Sandbox,
    SandboxError,
    cgroup,
)
from protofly.sandbox import isolation as iso
from protofly.sandbox.broker import NO_EGRESS, EgressPolicy
from protofly.sandbox.channel import DEFAULT_MAX_FRAME
from protofly.sandbox.host_spawn import HostSettings
from protofly.sandbox.process_component import KILL_WAIT, ProcessComponent
from protofly.sandbox.spares import SparePool
from protofly.tasks import TaskSet

__all__ = ["ProcessSandbox"]

_log = get_logger("protofly.sandbox")
#: Seconds between a deploy's ``created`` (or failure) and the start of the spare that replaces its host.
REFILL_DELAY = 0.05
#: Stub URLs whose limit hits are remembered across restarts.
_MAX_REMEMBERED = 10_000


class ProcessSandbox(Sandbox):
    """One OS process per stub (see the module doc).

    ``limits`` apply when a deploy passes none (the caller narrows them with the descriptor's request);
    ``use_bwrap`` None uses bwrap where it works (a missing bwrap is a recorded, logged fact), True
    requires it, False never uses it; ``prestart`` is how many idle hosts to keep started, and ``preload``
    the modules each host imports while idle (e.g. ``websockets.asyncio.client``, which costs a stub
    ~70 ms to import and a host ~5 MB of memory).  ``cgroups`` is ``auto``, ``require`` or ``off`` (see
    :mod:`~protofly.sandbox.cgroup`; ``cgroup_parent`` places the runtime's group), ``tmp_mb`` the size of
    each private ``/tmp``, ``sandbox_user`` whom a root runtime runs its hosts as.
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
        prestart_js: int = 1,
        preload: tuple[str, ...] | list[str] = (),
        python: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        start_timeout: float = 30.0,
        deploy_timeout: float = 15.0,
        close_grace: float = 1.0,
        workdir_root: str | None = None,
        cgroups: str = "auto",
        cgroup_parent: str = "",
        tmp_mb: int = 64,
        sandbox_user: str = "nobody",
        limit_poll: float = 0.25,
    ) -> None:
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
        if prestart < 0:
            raise ValueError(f"prestart must be 0 or more, got {prestart}")
        if cgroups not in ("auto", "require", "off"):
            raise ValueError(f"cgroups must be auto, require or off, got {cgroups!r}")
        if tmp_mb < 1:
            raise ValueError(f"tmp_mb must be at least 1, got {tmp_mb}")
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
        self.cgroups = cgroups
        self.cgroup_parent = cgroup_parent
        self.tmp_mb = tmp_mb
        self.sandbox_user = sandbox_user
        self.limit_poll = limit_poll
        self.probe: iso.Probe | None = None
        #: The runtime's cgroup (None: no cgroup layer; ``cgroup_missing`` says why).
        self.cgroup_tree: cgroup.CgroupTree | None = None
        self.cgroup_missing: str | None = None
        self._user_missing: str | None = None
        #: Limit hits per stub URL, over its restarts (bounded: the oldest URL is forgotten first).
        self._limit_hits: dict[str, dict[str, int]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._tasks = TaskSet("sandbox")
        self._spares: SparePool[ProcessComponent] = SparePool(prestart, self._new_host, self._tasks)
        #: Node hosts for JavaScript stubs, kept started once a JavaScript stub was deployed (or asked for).
        self._js_spares: SparePool[ProcessComponent] = SparePool(prestart_js, self._new_js_host, self._tasks)
        self._components: set[ProcessComponent] = set()
        #: Every host started and not yet reaped (spares, deployed, discarded).
        self._hosts: set[ProcessComponent] = set()
        self._closed = False
        self._start_lock: asyncio.Lock | None = None
        #: The refill :meth:`_put_off_refill` scheduled, not run yet.
        self._refill: asyncio.TimerHandle | None = None

    @property
    def components(self) -> list[ProcessComponent]:
        """The components deployed and not yet removed or exited."""
        return [c for c in self._components if c.state in ("deploying", "running")]

    @property
    def hosts(self) -> list[ProcessComponent]:
        """Every host process started and not yet reaped: deployed, spare, or being discarded."""
        return list(self._hosts)

    async def start(self) -> None:
        """Probe the isolation layers (once) and start the spare hosts; deploy() calls it if needed."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.probe is None:
                await self._probe_layers()
        self._spares.refill()

    async def _probe_layers(self) -> None:
        """Who the hosts run as, what bwrap offers, and the runtime's cgroup (once)."""
        try:
            user, self._user_missing = iso.sandbox_user(self.sandbox_user)
        except ValueError as exc:
            raise SandboxError(str(exc)) from None
        probe = await iso.probe(self.python, use_bwrap=self.use_bwrap, user=user)
        tree, why = await asyncio.to_thread(cgroup.probe, self.cgroups, self.cgroup_parent)
        if tree is None and self.cgroups == "require":
            raise SandboxError(f"cgroups are required by configuration but unusable: {why}")
        if why is not None and self.cgroups != "off":
            _log.warning("sandbox isolation layer missing", reason=why)
        for reason in [self._user_missing] if self._user_missing else []:
            _log.warning("sandbox isolation layer missing", reason=reason)
        self.cgroup_tree, self.cgroup_missing = tree, why
        self.probe = probe
        if tree is not None:
            self._watcher = self._tasks.spawn(self._watch_limits(), name="sandbox limit watcher")

    async def _watch_limits(self) -> None:
        """Read the kernel's limit counters of every running stub, every ``limit_poll`` seconds.

        The counters are pseudo-files (two reads per stub, tens of microseconds), and a stub that hit a
        limit is killed at once: between the hit and the kill, the kernel has kept it within the limit
        anyway.  A host the kernel OOM-killed is classified at its exit, without waiting for this.
        """
        while not self._closed:
            for component in list(self._components):
                component.check_limits()
            await asyncio.sleep(self.limit_poll)

    async def wait_ready(self, timeout: float = 30.0, *, javascript: bool = False) -> None:
        """Start the sandbox if needed and wait until its spare hosts are started.

        With ``javascript``, the spare Node hosts too (they are otherwise started after the first
        JavaScript deploy, so that a runtime serving only Python stubs runs no Node process).
        """
        await self.start()
        if javascript and self.unavailable("javascript") is None:
            self._js_spares.refill()
            await self._js_spares.wait_ready(timeout)
        await self._spares.wait_ready(timeout)

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
        egress: EgressPolicy | None = None,
        language: str = "python",
    ) -> ProcessComponent:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        problem = self.unavailable(language)
        if problem is not None:
            raise DeployError(problem)
        javascript = _is_javascript(language)
        text = _check_deploy_args(url, source, config, classname, boundary, on_message, on_exit, javascript)
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits or None, got {type(limits).__name__}")
        effective = limits if limits is not None else self.limits
        if len(text.encode()) + 1024 > self.max_frame:
            raise DeployError(
                f"ValueError: the stub source ({len(source)} bytes) does not fit the {self.max_frame}-byte frame limit"
            )
        await self.start()
        spares = self._js_spares if javascript else self._spares
        for attempt in (1, 2):
            asked = time.perf_counter()
            component = await spares.take()
            waited = time.perf_counter() - asked
            self._components.add(component)
            component.counters.update(self._limit_hits.get(url, {}))
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
                    egress=egress or NO_EGRESS,
                    waited=waited,
                )
                self._put_off_refill()
            except BaseException as exc:
                self._components.discard(component)
                self._put_off_refill()
                await self._reap_failed(component)
                if attempt == 1 and isinstance(exc, DeployError) and component.died_before_stub_code:
                    _log.warning("a sandbox host died before the stub's code ran; retrying on a new one", url=url)
                    continue
                raise
            return component
        raise AssertionError("unreachable")

    def _put_off_refill(self) -> None:
        """Start the spares that replace those the deploys took, :data:`REFILL_DELAY` from now.

        Not at once: a host's start does a few ms of work on the loop (its group, its command line, the
        fork) and more beside it (bwrap making namespaces, the cgroup move, the interpreter's start), which
        on two cores takes CPU the deploy needs: its stub's connect, the caller woken a few loop turns
        later, the first messages through the new stub.  A deploy meanwhile starts its host itself, as
        :meth:`start` refills the pool.
        """
        if self._refill is None and not self._closed:
            self._refill = asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill_now)

    def _refill_now(self) -> None:
        self._refill = None
        if not self._closed:
            self._spares.settle()
            self._js_spares.settle()

    def count_limit_hits(self, component: ProcessComponent) -> None:
        """Keep a component's limit-hit counters for the next component of its stub (after a restart)."""
        hits = {k: v for k, v in component.counters.items() if k in ("memory_limit", "process_limit") and v}
        if hits and component.url:
            self._limit_hits.pop(component.url, None)
            self._limit_hits[component.url] = hits
            while len(self._limit_hits) > _MAX_REMEMBERED:
                del self._limit_hits[next(iter(self._limit_hits))]  # pragma: no cover

    def unavailable(self, language: str) -> str | None:
        """Python stubs always run here; JavaScript stubs where Node.js is installed (see :mod:`.node`)."""
        from protofly.sandbox.node import is_javascript, missing

        if is_javascript(language):
            return missing(language)
        return super().unavailable(language)

    async def _reap_failed(self, component: ProcessComponent) -> None:
        """A failed or cancelled deploy leaves nothing worth a grace period: kill now and wait for the reap."""
        component.kill_now()
        reaped = self._tasks.spawn(component.wait_exit(KILL_WAIT), name="reap a failed deploy", shared=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(reaped)  # unless we are cancelled, return with the host reaped

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._refill is not None:
                self._refill.cancel()
                self._refill = None
            removals = [c.remove(self.close_grace) for c in self._components]
            removals.append(self._spares.close(self.close_grace, self.start_timeout))
            removals.append(self._js_spares.close(self.close_grace, self.start_timeout))
            await asyncio.gather(*removals, return_exceptions=True)
            self._components.clear()
        # Whatever else was started (spares cancelled while starting, discarded deploys) is killed already;
        # wait until every one of them is reaped, so that close() leaves no process behind.
        # The clean-up tasks (workdir removal) are waited for, not cancelled: they finish quickly.
        for host in list(self._hosts):
            if host.state != "exited":
                host.kill_now()
        waits = [asyncio.ensure_future(host.wait_exit(KILL_WAIT)) for host in list(self._hosts)]
        pending = waits + [task for task in self._tasks if task is not self._watcher]
        if pending:
            await asyncio.wait(pending, timeout=KILL_WAIT)
        # A host reaped during that wait (a spare cancelled while starting) began removing its cgroup only
        # then: wait for that too, or the runtime's group could not be removed after it.
        late = [task for task in self._tasks if task is not self._watcher and not task.done()]
        if late:
            await asyncio.wait(late, timeout=KILL_WAIT)
        await self._tasks.close()
        if self.cgroup_tree is not None:
            await asyncio.to_thread(self.cgroup_tree.remove)

    # -- hosts --------------------------------------------------------------------------------------

    def _reaped(self, component: ProcessComponent) -> None:
        self._hosts.discard(component)
        self.count_limit_hits(component)

    async def _new_js_host(self) -> ProcessComponent:
        """Start one Node host for a JavaScript stub (a spare, or for a deploy that found none ready)."""
        return await self._new_host(javascript=True)

    async def _new_host(self, *, javascript: bool = False) -> ProcessComponent:
        """Start one host (a spare, or the host of a deploy that found no spare ready)."""
        assert self.probe is not None
        settings = HostSettings(
            python=self.python,
            max_frame=self.max_frame,
            landlock=self.landlock,
            seccomp=self.seccomp,
            preload=self.preload,
            workdir_root=self.workdir_root,
            limits=self.limits,
            tmp_mb=self.tmp_mb,
            cgroups=self.cgroup_tree,
            cgroup_missing=self.cgroup_missing,
            user_missing=self._user_missing,
            node_spare=javascript,
            memory_mb=self.limits.memory_mb,
        )
        component = ProcessComponent(settings, self.probe, self._tasks, self._reaped)
        self._hosts.add(component)
        await component.start(self.start_timeout)
        return component


def _check_deploy_args(
    url: Any,
    source: Any,
    config: Any,
    classname: Any,
    boundary: Any,
    on_message: Any,
    on_exit: Any,
    javascript: bool = False,
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
        if javascript:  # reTHINK's own gen-1 packages are ISO-8859-1 (a licence comment): read them as such
            return bytes(source).decode("latin-1")
        raise DeployError(
            f"UnicodeDecodeError: stub source is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _is_javascript(language: str) -> bool:
    from protofly.sandbox.node import is_javascript

    return is_javascript(language)
