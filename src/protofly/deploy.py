"""The deploy pipeline: the seed's steps 3-12 for one stub, from catalogue to ``live``, timed step by step.

One run of :meth:`DeployPipeline.run` fetches and verifies the stub (3-4), instantiates it in the sandbox
with its configuration (5, 7, 9), connects it with the Identity Module's credentials (10) and waits for it
to publish ``live`` (11-12).  It raises :class:`StubDeploymentError` with the HTTP-style code that waiting
senders get; it decides nothing about retries (that is :mod:`protofly.supervision`'s job) and holds no
state beyond the run, so a deployment can be cancelled at any await and leaves only the component it
created, which the caller removes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from packaging.requirements import Requirement

from protofly.catalogue import CatalogueClient, CatalogueError, VerifiedStub
from protofly.config import RuntimeConfig
from protofly.events import DeployStep, EventStream
from protofly.identity import IdentityModule
from protofly.message import Message, error_description, response_code
from protofly.registry import RuntimeRegistry, StatusEvent, StatusTimeoutError, StubRecord
from protofly.sandbox import Boundary, Component, DeployError, Limits, Sandbox, SandboxError, active_layers
from protofly.sandbox.broker import EgressPolicy
from protofly.session_store import SessionStore
from protofly.supervision import AUTH_FAILURE, REQUIREMENTS_FAILURE

__all__ = ["DeployPipeline", "Step", "StubDeploymentError", "StubHandle"]


class StubDeploymentError(Exception):
    """A stub could not be deployed (or was given up on); ``code`` is the HTTP-style code senders get."""

    def __init__(self, domain: str, code: int, description: str, *, cause: str | None = None) -> None:
        super().__init__(f"stub for {domain}: {description}")
        self.domain = domain
        self.code = code
        self.description = description
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a deployment, with the seed steps it implements and how long it took."""

    name: str
    seed: str
    ms: float
    detail: str | None = None
    #: Where the step's time went, in ms per part, where it is broken down (``sandbox``: see
    #: :meth:`~protofly.sandbox.Component.deploy_parts`); the parts need not add up to ``ms``.
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class StubHandle:
    """What :meth:`Runtime.load_stub` returns: the stub's identity, live state and deploy timeline."""

    domain: str
    url: str
    record: StubRecord
    steps: list[Step] = field(default_factory=list)
    version: str | None = None
    signer: str | None = None
    catalogue_url: str | None = None
    from_cache: bool = False

    @property
    def status(self) -> str | None:
        return self.record.status

    @property
    def isolation(self) -> dict[str, Any]:
        return self.record.isolation

    @property
    def history(self) -> list[StatusEvent]:
        return list(self.record.history)

    @property
    def total_ms(self) -> float:
        return sum(step.ms for step in self.steps)


@dataclass(frozen=True, slots=True)
class Target:
    """What one run deploys, and where the stub's traffic and exit go."""

    domain: str
    reference: str
    record: StubRecord
    on_message: Callable[[Message], None]
    on_exit: Callable[[Component, str], None]


class DeployPipeline:
    """Runs the seed's deploy steps against the runtime's catalogue, sandbox, identity and registry."""

    def __init__(
        self,
        *,
        config: RuntimeConfig,
        registry: RuntimeRegistry,
        catalogue: CatalogueClient,
        sandbox: Sandbox,
        identity: IdentityModule,
        limits: Limits,
        events: EventStream,
        sessions: SessionStore | None = None,
    ) -> None:
        #: Saved stub state in, new instances tracked (``session_store.py``); None: neither.
        self.sessions = sessions
        self.config = config
        self.registry = registry
        self.catalogue = catalogue
        self.sandbox = sandbox
        self.identity = identity
        self.limits = limits
        self.events = events

    async def run(self, target: Target, *, refresh: bool, adopt: Callable[[Component], None]) -> StubHandle:
        """Deploy ``target`` until ``live``; ``adopt`` is given the component as soon as it exists."""
        record = target.record
        handle = StubHandle(domain=target.domain, url=record.url, record=record)
        deadline = time.monotonic() + self.config.deploy_timeout
        mark = time.perf_counter()

        def step(
            name: str, seed: str, since: float, detail: str | None = None, parts: dict[str, float] | None = None
        ) -> float:
            now = time.perf_counter()
            ms = (now - since) * 1000
            handle.steps.append(Step(name, seed, ms, detail, parts or {}))
            self.events.emit(DeployStep(target.domain, record.url, name, seed, round(ms, 3), detail))
            return now

        mark = step("registry", "1-2, 6, 8", mark, record.url)
        verified = await self._fetch(target, refresh, deadline)
        handle.version, handle.signer, handle.catalogue_url = verified.version, verified.signer, verified.url
        handle.from_cache = verified.from_cache
        origin = "cache" if verified.from_cache else verified.url
        mark = step("catalogue", "3-4", mark, f"{verified.descriptor.object_name} {verified.version} from {origin}")
        component = await self._instantiate(target, verified, deadline)
        adopt(component)
        layers = "+".join(active_layers(component.isolation))
        mark = step("sandbox", "5, 7, 9", mark, layers, component.deploy_parts())
        self.registry.report(record, "deployed")
        await self._connect(target, component, deadline)
        mark = step("connect", "10", mark)
        await self._wait_live(target, deadline)
        step("live", "11-12", mark)
        return handle

    async def _fetch(self, target: Target, refresh: bool, deadline: float) -> VerifiedStub:
        try:
            verified = await asyncio.wait_for(
                self.catalogue.fetch_stub(target.reference, refresh=refresh), _left(deadline)
            )
        except CatalogueError as exc:
            raise StubDeploymentError(target.domain, 503, f"{exc.code}: {exc.message}", cause=exc.code) from None
        except TimeoutError:
            raise StubDeploymentError(
                target.domain, 504, "catalogue did not answer within the deploy timeout"
            ) from None
        problem = self.sandbox.unavailable(verified.descriptor.language)
        if problem is not None:
            raise StubDeploymentError(target.domain, 501, problem, cause="missing-capability")
        missing = missing_requirements(verified.descriptor.requirements)
        if missing:
            raise StubDeploymentError(
                target.domain, 424, f"requirements: {'; '.join(missing)}", cause=REQUIREMENTS_FAILURE
            )
        return verified

    async def _instantiate(self, target: Target, verified: VerifiedStub, deadline: float) -> Component:
        descriptor = verified.descriptor
        config = dict(descriptor.configuration)
        config["runtimeURL"] = self.registry.runtime_url
        saved = self.sessions.saved(target.domain) if self.sessions is not None else None
        if saved is not None:
            config["savedState"] = saved
        boundary = Boundary(
            runtime_url=self.registry.runtime_url,
            runtime_domain=self.config.domain,
            stub_domain=target.domain,
            is_local=self.registry.is_local_component,
            local_version=self.registry.local_generation,
        )
        holder: list[Component] = []
        try:
            component = await asyncio.wait_for(
                self.sandbox.deploy(
                    url=target.record.url,
                    source=verified.source,
                    config=config,
                    classname=descriptor.source_classname,
                    limits=self.limits.narrowed(descriptor.sandbox_limits),
                    boundary=boundary,
                    on_message=target.on_message,
                    on_exit=lambda reason: target.on_exit(holder[0], reason) if holder else None,
                    egress=EgressPolicy(
                        descriptor.egress,
                        hosts=self.config.hosts,
                        resolver_only=self.config.resolver_only,
                        connect_timeout=self.config.egress_connect_timeout,
                    ),
                    language=descriptor.language,
                ),
                _left(deadline),
            )
        except DeployError as exc:
            raise StubDeploymentError(target.domain, 503, f"stub failed to start: {exc.summary}") from None
        except (TimeoutError, SandboxError, ValueError) as exc:
            raise StubDeploymentError(target.domain, 503, f"sandbox failed: {exc or type(exc).__name__}") from None
        if self.sessions is not None:
            component = self.sessions.track(target.domain, component)
        holder.append(component)
        record = target.record
        record.isolation = component.isolation
        record.sandbox_counters = component.counters
        record.info["pid"] = component.pid
        return component

    async def _connect(self, target: Target, component: Component, deadline: float) -> None:
        credentials = self.identity.credentials_for(target.domain)
        try:
            answer = await component.execute("connect", [credentials], timeout=_left(deadline))
        except TimeoutError:
            raise StubDeploymentError(
                target.domain,
                504,
                f"stub did not go live within {self.config.deploy_timeout:g} s (its connect did not return)",
            ) from None
        except SandboxError as exc:
            reason = target.record.last_description() or str(exc)
            raise StubDeploymentError(target.domain, 503, f"stub stopped while connecting: {reason}") from None
        code = response_code(answer)
        if code in (401, 403):
            reason = error_description(answer.body) or f"code {code}"
            raise StubDeploymentError(target.domain, 401, f"credentials refused: {reason}", cause=AUTH_FAILURE)
        if code is None or code >= 300:
            reason = error_description(answer.body) or f"code {code}"
            raise StubDeploymentError(target.domain, 503, f"stub's connect failed: {reason}")

    async def _wait_live(self, target: Target, deadline: float) -> None:
        record = target.record
        try:
            await self.registry.wait_for_status(record, ("live", "failed"), _left(deadline))
        except StatusTimeoutError:
            raise StubDeploymentError(
                target.domain,
                504,
                f"stub did not go live within {self.config.deploy_timeout:g} s (status {record.status})",
            ) from None
        if record.connection != "live":
            reason = record.last_description() or "no reason given"
            raise StubDeploymentError(target.domain, 503, f"stub failed to connect: {reason}")


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """What the sandbox's environment lacks of ``requirements`` (the stub's host runs this interpreter)."""
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed in the sandbox environment (the stub needs {text})")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} is installed; the stub needs {text}")
    return problems


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
