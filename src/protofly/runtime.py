"""The Runtime UA and the composition root: :class:`Runtime` wires the parts and is what an application holds.

How the seed's steps map to the code (``docs/architecture.md`` has the full table):

1-2   a trigger (:meth:`Runtime.load_stub`, or a message to an address of a domain without a stub: the
      registry's routing function answers "needs a stub") finds no stub in the registry; the registry
      records one as ``deploying`` and allocates its URL right away, so that the first messages can wait
      in order in the stub's port (:mod:`protofly.port`);
3-12  the deploy pipeline (:mod:`protofly.deploy`): catalogue fetch and verification, sandbox, connect with
      the Identity Module's credentials, and the stub's own ``live``.

What to do with each domain's stub — deploy, queue, forward, answer, restart, give up — is decided by its
:class:`~protofly.supervision.StubLifecycle`, a machine without I/O; :mod:`protofly.supervisor` performs
its actions.  This module composes the parts, offers the API and routes messages to stubs.
"""

from __future__ import annotations

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
from protofly.deploy import DeployPipeline, Step, StubDeploymentError, StubHandle
from protofly.events import EventStream
from protofly.hyperty import Handler, Hyperty, allocate_hyperty
from protofly.identity import IdentityModule
from protofly.liveness import LivenessMonitor, LivenessPolicy
from protofly.log import get_logger
from protofly.message import Message
from protofly.rebind import Rebinder
from protofly.registry import Local, NeedsStub, RegistryError, RuntimeRegistry, StubRecord, ToStub
from protofly.sandbox import Limits, Sandbox, create_sandbox
from protofly.session_store import SessionStore
from protofly.supervision import Phase, Policy, RetryNow, Trigger
from protofly.supervisor import Supervisor
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
        #: The stub table and the performer of each stub's lifecycle (:mod:`protofly.supervisor`).
        self.supervisor = Supervisor(
            config,
            bus=self.bus,
            events=self.events,
            sessions=self.sessions,
            admission=self.admission,
            policy=self.policy,
            boundary_policy=self.boundary_policy,
            warnings=self.warnings,
            clock=clock,
            uniform=uniform,
        )
        self._stubs = self.supervisor.stubs
        self._registry: RuntimeRegistry | None = None
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
            feed=lambda stub, event: self.supervisor.perform(stub, stub.machine.handle(event)),
        )
        self.liveness.start()
        pipeline = DeployPipeline(
            config=config,
            registry=self._registry,
            catalogue=self._catalogue,
            sandbox=self._sandbox,
            identity=self._identity,
            limits=self.limits,
            events=self.events,
            sessions=self.sessions,
        )
        self.supervisor.start(self._registry, pipeline)
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
        self.supervisor.closing = True
        if self.liveness is not None:
            await self.liveness.close()
        await self.supervisor.close()
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
            stub = self.supervisor.new_stub(domain, name, reference)
        elif stub.name != name:
            raise StubDeploymentError(
                domain, 409, f"stub {stub.name!r} already serves {domain}; unload it before loading {name!r}"
            )
        if stub.live and stub.handle is not None:
            return stub.handle
        self.supervisor.perform(stub, stub.machine.handle(Trigger()))
        return await self.supervisor.outcome(stub)

    async def unload_stub(self, domain: str) -> StubRecord:
        """Disconnect and remove the stub of ``domain``; waiting messages get ``503``."""
        stub = self._stubs.pop(address.validate_domain(domain), None)
        if stub is None:
            raise StubDeploymentError(domain, 404, f"no stub is loaded for {domain}")
        await self.supervisor.unload(stub, "stub unloaded")
        return stub.record

    async def retry_now(self, domain: str) -> StubHandle:
        """Forget crash history and backoff and deploy ``domain``'s stub again now (fresh from the catalogue)."""
        stub = self._stubs.get(address.validate_domain(domain))
        if stub is None:
            return await self.load_stub(domain)
        if stub.live and stub.handle is not None:
            return stub.handle
        await self.supervisor.cancel_deploy(stub)
        self.supervisor.perform(stub, stub.machine.handle(RetryNow()))
        return await self.supervisor.outcome(stub)

    def set_credentials(self, domain: str, credentials: Mapping[str, Any]) -> None:
        """Replace the credentials handed to ``domain``'s stub when it connects (never logged).

        A stub whose back-end refused the old ones stays ``auth-failed`` until :meth:`retry_now`.
        """
        self.identity.set(address.validate_domain(domain), credentials)

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
                stub = self.supervisor.new_stub(route.domain, "default", route.domain)
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
            self.supervisor.evict(victim)
        return refusal
