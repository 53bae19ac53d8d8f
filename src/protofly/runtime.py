"""The Runtime UA and the composition root: :class:`Runtime` wires the parts and is what an application holds.

How the seed's steps map to the code (``docs/architecture.md`` has the full table):

1-2   a trigger (:meth:`Runtime.load_stub`, or a message to an address of a domain without a stub: the
      registry's routing function answers "needs a stub") finds no stub in the registry; the registry
      records one as ``deploying`` and allocates its URL right away, so that the first messages can wait
      in order in the stub's port (:mod:`protofly.port`);
3-12  the deploy pipeline (:mod:`protofly.deploy`): catalogue fetch and verification, sandbox, connect with
      the Identity Module's credentials, and the stub's own ``live``.

What to do with each domain's stub — deploy, queue, forward, answer, restart, give up — is decided by its
:class:`~protofly.supervision.StubLifecycle`, a machine without I/O; this module performs its actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from protofly import address
from protofly.admission import DeployAdmission, Refusal
from protofly.boundary import BoundaryPolicy
from protofly.bus import MessageBus, Rejected
from protofly.catalogue import CatalogueClient
from protofly.catalogue.keys import TrustStore
from protofly.config import RuntimeConfig
from protofly.deploy import DeployPipeline, Step, StubDeploymentError, StubHandle, Target
from protofly.events import (
    CrashLoop,
    DeployFailed,
    EventStream,
    RestartScheduled,
    StubCrashed,
    StubLive,
    StubUnloaded,
)
from protofly.hyperty import Handler, Hyperty, allocate_hyperty
from protofly.identity import IdentityModule
from protofly.liveness import LivenessMonitor, LivenessPolicy
from protofly.log import get_logger
from protofly.message import Message
from protofly.rebind import Rebinder
from protofly.registry import Local, NeedsStub, RegistryError, RuntimeRegistry, StubRecord, ToStub
from protofly.sandbox import Component, Limits, Sandbox, create_sandbox
from protofly.session_store import SessionStore
from protofly.supervised import SupervisedStub
from protofly.supervision import (
    Action,
    AnswerQueued,
    CancelDeploy,
    Crashed,
    Deployed,
    DeployStarted,
    Enqueue,
    Failure,
    FlushQueue,
    Forward,
    GaveUp,
    Incoming,
    Phase,
    Policy,
    Refuse,
    Reject,
    RetryNow,
    StartDeploy,
    StubLifecycle,
    Trigger,
    Unload,
)
from protofly.supervision import DeployFailed as DeployFailedEvent
from protofly.supervision import RestartScheduled as RestartAction
from protofly.tasks import TaskSet
from protofly.throttle import LogThrottle

__all__ = ["Runtime", "Step", "StubDeploymentError", "StubHandle"]

log = get_logger("protofly.runtime")


def _process_options(config: RuntimeConfig) -> dict[str, Any]:
    """The process sandbox's settings from the configuration (containment layers, preloads)."""
    return {
        "preload": tuple(config.sandbox_preload),
        "cgroups": config.cgroups,
        "cgroup_parent": config.cgroup_parent,
        "tmp_mb": config.tmp_mb,
        "sandbox_user": config.sandbox_user,
    }


class Runtime:
    """A Hyperty Runtime core: use as ``async with Runtime(RuntimeConfig(domain="a.test")) as rt``."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        sandbox: Sandbox | None = None,
        catalogue: CatalogueClient | None = None,
        identity: IdentityModule | None = None,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self.bus = MessageBus(request_timeout=config.request_timeout)
        #: Every deploy step, status change, restart and unload, as typed events (:mod:`protofly.events`).
        self.events = EventStream()
        #: Stub state and messages that outlive a stub's process (``session_store.py``).
        self.sessions = SessionStore(self.bus)
        #: Re-claims the hyperties' addresses when the home node lost the session (``rebind.py``).
        self.rebinder = Rebinder(self.bus, self.events, config.domain, config.request_timeout)
        self.limits = Limits(
            memory_mb=config.memory_mb,
            cpu_seconds=config.cpu_seconds,
            open_files=config.open_files,
            processes=config.processes,
        )
        self.policy = Policy(
            backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap,
            crash_budget=config.crash_budget,
            crash_window=config.crash_window,
            stable_after=config.stable_after,
        )
        self.clock = clock
        self.uniform = uniform
        self.boundary_policy = BoundaryPolicy(
            status_rate=config.stub_status_rate,
            status_burst=config.stub_status_burst,
            message_rate=config.stub_message_rate,
            message_burst=config.stub_message_burst,
        )
        self.admission = DeployAdmission(
            max_stubs=config.max_stubs,
            max_deploying=config.max_concurrent_deploys,
            negative_ttl=config.negative_ttl,
            clock=clock,
        )
        #: One summary line per stub, kind and interval for everything a stub makes the runtime refuse.
        self.warnings = LogThrottle(log, clock=clock)
        self._sandbox = sandbox
        self._catalogue = catalogue
        self._identity = identity
        self._stubs: dict[str, SupervisedStub] = {}
        self._tasks = TaskSet("runtime")
        self._registry: RuntimeRegistry | None = None
        self._pipeline: DeployPipeline | None = None
        #: Pings live stubs and expires unrefreshed `live` statuses (:mod:`protofly.liveness`).
        self.liveness: LivenessMonitor | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        try:
            await self._start_parts()
        except BaseException:
            await self.close()  # whatever did start is stopped again: no half-started runtime
            raise
        return self

    async def _start_parts(self) -> None:
        config = self.config
        self._registry = await RuntimeRegistry.open(
            self.bus, domain=config.domain, state_dir=config.state_dir, events=self.events
        )
        self.bus.set_resolver(self._resolve)
        if self._identity is None:
            self._identity = IdentityModule.load(config.credentials_file)
        if self._catalogue is None:
            trust = TrustStore.load(config.trust_store) if config.trust_store else None
            self._catalogue = CatalogueClient(
                home_domain=config.domain,
                state_dir=config.state_dir,
                resolver=config.catalogues,
                trust=trust,
                policy=config.policy,
                allow_http_loopback=config.allow_http_loopback,
                resolver_only=config.resolver_only,
                fetch_timeout=config.deploy_timeout,
            )
        await self._catalogue.__aenter__()
        if self._sandbox is None:
            options = _process_options(config) if config.sandbox == "process" else {}
            self._sandbox = create_sandbox(
                config.sandbox, limits=self.limits, max_frame=config.max_message_size, **options
            )
        await self._sandbox.start()  # probe isolation and pre-start a host now, not on the first deploy
        self.liveness = LivenessMonitor(
            LivenessPolicy(config.ping_interval, config.ping_timeout, config.status_ttl, config.status_ttl_after_error),
            registry=self._registry,
            events=self.events,
            stubs=lambda: list(self._stubs.values()),
            lookup=self._stubs.get,
            feed=lambda stub, event: self._perform(stub, stub.machine.handle(event)),
        )
        self.liveness.start()
        self._pipeline = DeployPipeline(
            config=config,
            registry=self._registry,
            catalogue=self._catalogue,
            sandbox=self._sandbox,
            identity=self._identity,
            limits=self.limits,
            events=self.events,
            sessions=self.sessions,
        )
        log.info("runtime started", runtime_url=self.runtime_url, sandbox=config.sandbox)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every stub (no process survives), then the sandbox, the catalogue client and the bus."""
        if self._closing:
            return
        self._closing = True
        if self.liveness is not None:
            await self.liveness.close()
        await asyncio.gather(*(self._unload(stub, "runtime closed") for stub in list(self._stubs.values())))
        self._stubs.clear()
        await self._tasks.close()
        await self.rebinder.close()
        if self._sandbox is not None:
            await self._sandbox.close()
        if self._catalogue is not None:
            await self._catalogue.close()
        if self._registry is not None:
            await self._registry.close()
        await self.bus.close()

    # -- accessors -------------------------------------------------------------------------------

    @property
    def registry(self) -> RuntimeRegistry:
        if self._registry is None:
            raise RuntimeError("the runtime is not started: use 'async with Runtime(...)'")
        return self._registry

    @property
    def runtime_url(self) -> str:
        return self.registry.runtime_url

    @property
    def catalogue(self) -> CatalogueClient:
        if self._catalogue is None:
            raise RuntimeError("the runtime is not started")
        return self._catalogue

    @property
    def identity(self) -> IdentityModule:
        if self._identity is None:
            raise RuntimeError("the runtime is not started")
        return self._identity

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise RuntimeError("the runtime is not started")
        return self._sandbox

    def stubs(self) -> list[StubRecord]:
        return self.registry.stubs()

    def usage(self, domain: str) -> dict[str, Any] | None:
        """What ``domain``'s stub uses now, from its cgroup: ``memory_bytes``, ``memory_peak_bytes``,
        ``cpu_seconds``, ``processes`` (None: no stub running, or no cgroup to account it)."""
        stub = self._stubs.get(domain)
        component = None if stub is None else stub.component
        return None if component is None else component.usage()

    @property
    def counters(self) -> dict[str, int]:
        """Runtime-wide counters (per-stub ones are on each :class:`StubRecord`): deploy admission."""
        return dict(self.admission.counters)

    def phase(self, domain: str) -> Phase | None:
        """The supervision phase of ``domain``'s stub (None: no stub is loaded for it)."""
        stub = self._stubs.get(domain)
        return None if stub is None else stub.machine.phase

    def queued(self, domain: str) -> int:
        """Messages held in ``domain``'s stub port while it deploys or restarts."""
        stub = self._stubs.get(domain)
        return 0 if stub is None else len(stub.port)

    # -- the API: hyperties, load, unload, retry -------------------------------------------------

    async def new_hyperty(self, handler: Handler | None = None) -> Hyperty:
        """A new ``hyperty://<domain>/<id>`` allocated by the home domain's message node.

        The home stub is deployed on demand by the allocation request itself (the seed's "deployment of a
        Hyperty" trigger).  ``handler`` gets incoming messages; a non-None return value answers with 200.
        """
        hyperty = await allocate_hyperty(self.bus, self.registry, self.config, handler)
        self.rebinder.add(hyperty)
        return hyperty

    async def load_stub(self, reference: str) -> StubHandle:
        """Deploy the stub of a domain (or named by a catalogue URL) and wait until it is ``live``.

        A stub that is already live is returned at once; one being deployed is waited for (every caller
        shares one deployment).  Raises :class:`StubDeploymentError` with the reason when it fails.
        """
        domain, name = address.split_stub_reference(reference)
        stub = self._stubs.get(domain)
        if stub is None:
            stub = self._new_stub(domain, name, reference)
        elif stub.name != name:
            raise StubDeploymentError(
                domain, 409, f"stub {stub.name!r} already serves {domain}; unload it before loading {name!r}"
            )
        if stub.live and stub.handle is not None:
            return stub.handle
        self._perform(stub, stub.machine.handle(Trigger()))
        return await self._outcome(stub)

    async def unload_stub(self, domain: str) -> StubRecord:
        """Disconnect and remove the stub of ``domain``; waiting messages get ``503``."""
        stub = self._stubs.pop(address.validate_domain(domain), None)
        if stub is None:
            raise StubDeploymentError(domain, 404, f"no stub is loaded for {domain}")
        await self._unload(stub, "stub unloaded")
        return stub.record

    async def retry_now(self, domain: str) -> StubHandle:
        """Forget crash history and backoff and deploy ``domain``'s stub again now (fresh from the catalogue)."""
        stub = self._stubs.get(address.validate_domain(domain))
        if stub is None:
            return await self.load_stub(domain)
        if stub.live and stub.handle is not None:
            return stub.handle
        await self._cancel_deploy(stub)
        self._perform(stub, stub.machine.handle(RetryNow()))
        return await self._outcome(stub)

    def set_credentials(self, domain: str, credentials: Mapping[str, Any]) -> None:
        """Replace the credentials handed to ``domain``'s stub when it connects (never logged).

        A stub whose back-end refused the old ones stays ``auth-failed`` until :meth:`retry_now`.
        """
        self.identity.set(address.validate_domain(domain), credentials)

    async def _outcome(self, stub: SupervisedStub) -> StubHandle:
        if stub.task is None:
            failure = stub.machine.failure or Failure(503, f"stub for {stub.domain} is not being deployed")
            raise StubDeploymentError(stub.domain, failure.code, failure.description, cause=failure.cause)
        return await asyncio.shield(stub.task)

    # -- routing -------------------------------------------------------------------------------------

    def _resolve(self, msg: Message) -> str | None:
        """The bus's resolver: the registry's route, with a deployment started for a domain without stub."""
        assert self._registry is not None, "the bus resolves only after the runtime started"
        route = self._registry.route(msg)
        if type(route) is ToStub:
            return route.url
        if isinstance(route, NeedsStub) and not self._closing:
            refusal = self._admit_deploy(route.domain)
            if refusal is not None:
                raise Rejected(refusal.code, refusal.description)
            try:
                stub = self._new_stub(route.domain, "default", route.domain)
            except (RegistryError, address.AddressError) as exc:
                log.warning("cannot deploy on demand", domain=route.domain, error=str(exc))
                return None
            return stub.record.url
        if isinstance(route, Local):
            return None  # a local address with no listener: the bus answers 404
        return None

    def _admit_deploy(self, domain: str) -> Refusal | None:
        """Bounds on deployments local code triggers; a failed stub may be evicted to make room."""
        stubs = self._stubs
        deploying = sum(1 for stub in stubs.values() if stub.machine.phase in (Phase.DEPLOYING, Phase.BACKOFF))
        victim = None
        if len(stubs) >= self.config.max_stubs:
            failed = (Phase.FAILED_RETRYABLE, Phase.FAILED_PERMANENT)
            victim = next((stub for stub in stubs.values() if stub.machine.phase in failed), None)
        refusal = self.admission.check(domain, stubs=len(stubs), deploying=deploying, evictable=victim is not None)
        if refusal is None and victim is not None:
            self._evict(victim)
        return refusal

    def _evict(self, stub: SupervisedStub) -> None:
        """Forget a failed stub (no process, no task) and answer its domain from the negative cache."""
        failure = stub.machine.failure or Failure(503, f"stub for {stub.domain} failed")
        self.admission.remember_failure(stub.domain, failure.code, failure.description)
        del self._stubs[stub.domain]
        stub.listener.remove()
        self._perform(stub, stub.machine.handle(Unload("evicted to make room for another domain")))
        with contextlib.suppress(RegistryError):
            self.registry.unregister_stub(stub.domain)
        self.events.emit(StubUnloaded(stub.domain, stub.record.url, "evicted after failing"))

    def _incoming(self, stub: SupervisedStub, msg: Message) -> None:
        """A message at a stub's port that is not live: the machine says forward, hold or refuse."""
        self._perform(stub, stub.machine.handle(Incoming()), msg)

    # -- performing the machine's actions ----------------------------------------------------------

    def _perform(self, stub: SupervisedStub, actions: list[Action], msg: Message | None = None) -> None:
        gave_up: str | None = None
        for action in actions:
            match action:
                case Forward() if msg is not None and stub.component is not None:
                    stub.port.forward(stub.component, msg)
                case Enqueue() if msg is not None:
                    stub.port.hold(msg)
                case Reject(code, description) if msg is not None:
                    stub.port.reject(msg, code, description)
                case StartDeploy(delay, refresh):
                    stub.task = self._tasks.spawn(self._deployment(stub, delay, refresh), shared=True)
                case FlushQueue():
                    component = stub.component
                    if component is not None:
                        stub.port.flush(component, lambda: stub.live)
                case AnswerQueued(code, description):
                    stub.port.answer_all(code, description)
                case RestartAction(reason, delay):
                    stub.record.restarts = stub.machine.restarts
                    self.events.emit(StubCrashed(stub.domain, stub.record.url, reason, round(delay, 3)))
                case GaveUp(reason, crashes):
                    log.error("stub crash loop: giving up", domain=stub.domain, stub_url=stub.record.url)
                    self.events.emit(CrashLoop(stub.domain, stub.record.url, reason, crashes))
                    # after the queue's answer (the next action): what the dead instance held or waits for
                    gave_up = f"the stub for {stub.domain} crashed for good: {reason}"
                case Refuse() | CancelDeploy():
                    pass  # load_stub raises the failure; cancellation is awaited by the caller
        if gave_up is not None:
            self.sessions.abandon(stub.domain, gave_up)

    async def _deployment(self, stub: SupervisedStub, delay: float, refresh: bool) -> StubHandle:
        if delay:
            self.events.emit(RestartScheduled(stub.domain, stub.record.url, round(delay, 3)))
            await asyncio.sleep(delay)
            self._perform(stub, stub.machine.handle(DeployStarted()))
        if stub.record.deployment != "deploying":
            self.registry.report(stub.record, "deploying")
        target = Target(
            stub.domain,
            stub.reference,
            stub.record,
            on_message=stub.from_stub,
            on_exit=lambda component, reason: self._on_exit(stub, component, reason),
        )
        pipeline = self._pipeline
        assert pipeline is not None, "deployments start only after the runtime started"
        try:
            handle = await pipeline.run(target, refresh=refresh, adopt=lambda c: setattr(stub, "component", c))
        except StubDeploymentError as error:
            await self._discard_component(stub)
            self._deploy_failed(stub, error)
            raise
        except asyncio.CancelledError:
            await self._discard_component(stub)
            raise
        finally:
            if stub.task is asyncio.current_task():
                stub.task = None
        stub.handle = handle
        stub.record.info.pop("cause", None)
        self.sessions.redeliver(stub.domain, stub.component)  # what a dead instance left, before the queue
        self._perform(stub, stub.machine.handle(Deployed()))
        pid = stub.record.info.get("pid")
        self.events.emit(StubLive(stub.domain, stub.record.url, round(handle.total_ms, 3), pid))
        return handle

    def _deploy_failed(self, stub: SupervisedStub, error: StubDeploymentError) -> None:
        stub.record.info["cause"] = error.cause
        self.registry.report(stub.record, "deployment-failed", error.description)
        log.warning("stub deployment failed", domain=stub.domain, stub_url=stub.record.url, reason=error.description)
        self.events.emit(DeployFailed(stub.domain, stub.record.url, error.code, error.description))
        failure = Failure(error.code, error.description, error.cause)
        self._perform(stub, stub.machine.handle(DeployFailedEvent(failure)))
        # after the queue got its answer: what a dead instance held, or waits for through it
        self.sessions.abandon(stub.domain, f"the stub for {stub.domain} could not be restarted: {error.description}")

    def _on_exit(self, stub: SupervisedStub, component: Component, reason: str) -> None:
        """The stub's process ended (the sandbox already published ``failed`` with ``reason``)."""
        if stub.component is not component or self._closing:
            return
        stub.component = None
        log.warning("stub crashed", domain=stub.domain, stub_url=stub.record.url, reason=reason)
        if stub.record.connection != "failed":  # the sandbox's status on the stub's behalf may have been refused
            self.registry.report(stub.record, "failed", reason, source="runtime")
        self._perform(stub, stub.machine.handle(Crashed(reason)))  # in a deployment it fails by itself

    # -- stub table ------------------------------------------------------------------------------

    def _new_stub(self, domain: str, name: str, reference: str) -> SupervisedStub:
        record = self.registry.register_stub(domain, name=name, descriptor_url=reference)
        stub = SupervisedStub(
            domain,
            name,
            reference,
            record,
            bus=self.bus,
            registry=self.registry,
            lifecycle=StubLifecycle(domain, self.policy, clock=self.clock, uniform=self.uniform),
            queue_limit=self.config.queue_limit,
            boundary_policy=self.boundary_policy,
            warnings=self.warnings,
            clock=self.clock,
            on_idle_message=self._incoming,
            save_state=self.sessions.save,
        )
        self._stubs[domain] = stub
        return stub

    async def _cancel_deploy(self, stub: SupervisedStub) -> None:
        task, stub.task = stub.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StubDeploymentError):
                await task

    async def _discard_component(self, stub: SupervisedStub) -> None:
        component, stub.component = stub.component, None
        if component is not None:
            with contextlib.suppress(Exception):
                await component.remove(grace=0.2)

    async def _unload(self, stub: SupervisedStub, reason: str) -> None:
        await self._cancel_deploy(stub)
        component, stub.component = stub.component, None
        if component is not None:
            try:
                await component.remove(grace=self.config.remove_grace)
            except Exception as exc:
                log.error("removing stub failed", stub_url=stub.record.url, error=str(exc))
        stub.listener.remove()
        self._perform(stub, stub.machine.handle(Unload(reason)))
        self.sessions.abandon(stub.domain, f"the stub for {stub.domain} was unloaded: {reason}")
        with contextlib.suppress(RegistryError):
            self.registry.unregister_stub(stub.domain)
        self.events.emit(StubUnloaded(stub.domain, stub.record.url, reason))
