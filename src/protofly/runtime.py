"""The Runtime UA: deploys protocol stubs on demand (the seed, steps 1-12) and keeps them running.

:class:`Runtime` is also the composition root: it wires the bus, the registry, the identity module, the
catalogue client and the sandbox, and is the one object an application holds.

How the seed's steps map to the code (``docs/architecture.md`` has the full table):

1-2   a trigger (:meth:`Runtime.load_stub`, or a message to an address of a domain without a stub, via the
      registry's resolver) finds no stub in the registry; the registry records one as ``deploying`` and
      allocates its URL right away, so that the messages of that first attempt can wait in order;
3-4   the catalogue client derives the descriptor URL from the domain, downloads descriptor and code, and
      verifies them (digest, signature, rollback) before anything runs;
5, 7  the sandbox starts an isolated process and instantiates the stub in it (``activate``);
6, 8  the registry's status listener and the bus listener for the stub URL exist from the start: the
      bus listener is the stub's *port*, which queues messages until the stub is live;
9-10  the stub is initialised with the descriptor's configuration plus ``runtimeURL`` and connected with
      the Identity Module's credentials for its domain;
11-12 the stub publishes its status; the deployment is over when it says ``live``, and the port then
      forwards the queued messages in order.

Single-flight: everything for one domain goes through one :class:`_Slot`, whose deployment task every
explicit and implicit trigger shares.  After a crash the slot restarts the stub with capped, jittered
exponential backoff; more than ``crash_budget`` crashes in ``crash_window`` seconds leave it ``failed``
until :meth:`Runtime.retry_now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from protofly import address
from protofly.bus import BusClosedError, MessageBus
from protofly.catalogue import CatalogueClient, CatalogueError
from protofly.catalogue.errors import E_CHANGED, E_DIGEST, E_ROLLBACK, E_SIGNATURE, E_UNSIGNED, E_UNTRUSTED
from protofly.catalogue.keys import TrustStore
from protofly.config import RuntimeConfig
from protofly.hyperty import Hyperty, allocate_hyperty
from protofly.identity import IdentityModule
from protofly.log import get_logger
from protofly.message import Message, error_description, response_code
from protofly.registry import RegistryError, RuntimeRegistry, StatusTimeoutError, StubRecord
from protofly.sandbox import (
    Boundary,
    Component,
    DeployError,
    Limits,
    Sandbox,
    SandboxError,
    active_layers,
    create_sandbox,
)

__all__ = ["Runtime", "Step", "StubDeploymentError", "StubHandle"]

log = get_logger("protofly.runtime")

#: Catalogue failures that another attempt cannot fix: the bytes or the keys are wrong, not the network.
VERIFICATION_FAILURES = frozenset({E_DIGEST, E_SIGNATURE, E_UNTRUSTED, E_UNSIGNED, E_ROLLBACK, E_CHANGED})


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
    def history(self) -> list[Any]:
        return self.record.history

    @property
    def total_ms(self) -> float:
        return sum(step.ms for step in self.steps)


class _Slot:
    """Everything about one domain's stub: its record, its process, its port queue, its supervision."""

    def __init__(self, runtime: Runtime, domain: str, name: str, reference: str, record: StubRecord) -> None:
        self.runtime = runtime
        self.domain = domain
        self.name = name
        self.reference = reference
        self.record = record
        self.component: Component | None = None
        self.forwarding = False
        self.queue: deque[Message] = deque()
        self.task: asyncio.Task[StubHandle] | None = None
        self.failure: StubDeploymentError | None = None
        self.retry_at = 0.0
        self.crashes: deque[float] = deque()
        self.attempt = 0
        self.live_since: float | None = None
        self.supervised = False  # went live once: from then on failures are restarted automatically
        self.handle: StubHandle | None = None
        self.listener = runtime.bus.add_listener(record.url, self.on_bus_message)

    # The stub's port: the bus listener at the stub URL.
    def on_bus_message(self, msg: Message) -> None:
        component = self.component
        if self.forwarding and component is not None:
            if not component.post(msg):
                self.runtime.bus.reply_error(msg, 503, _channel_full(self.domain))
            return
        if self.task is None and self.failure is not None:
            if not self.runtime._may_retry(self):
                self.runtime.bus.reply_error(msg, self.failure.code, self.failure.description)
                return
            self.runtime._start(self)
        if len(self.queue) >= self.runtime.config.queue_limit:
            self.runtime.bus.reply_error(msg, 503, f"stub for {self.domain} is not live and its queue is full")
            return
        self.queue.append(msg)


class Runtime:
    """A Hyperty Runtime core: use as ``async with Runtime(RuntimeConfig(domain="a.test")) as rt``."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        sandbox: Sandbox | None = None,
        catalogue: CatalogueClient | None = None,
        identity: IdentityModule | None = None,
    ) -> None:
        self.config = config
        self.bus = MessageBus(request_timeout=config.request_timeout)
        self.limits = Limits(memory_mb=config.memory_mb, cpu_seconds=config.cpu_seconds, open_files=config.open_files)
        self._sandbox = sandbox
        self._catalogue = catalogue
        self._identity = identity
        self._slots: dict[str, _Slot] = {}
        self._local: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._observers: list[Callable[[dict[str, Any]], None]] = []
        self._registry: RuntimeRegistry | None = None
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
        self._registry = await RuntimeRegistry.open(self.bus, domain=config.domain, state_dir=config.state_dir)
        self.bus.set_resolver(self._registry.resolve)
        self._registry.set_deployer(self._deploy_on_demand)
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
            options = {"preload": tuple(config.sandbox_preload)} if config.sandbox == "process" else {}
            self._sandbox = create_sandbox(config.sandbox, limits=self.limits, **options)
        await self._sandbox.start()  # probe isolation and pre-start a host now, not on the first deploy
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
        await asyncio.gather(*(self._unload(slot, "runtime closed") for slot in list(self._slots.values())))
        self._slots.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
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

    def add_observer(self, observer: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Be told of deploy steps and supervision decisions (the demo's timeline); returns a remover."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def add_local_address(self, url: str) -> None:
        """Declare ``url`` one of this runtime's local components: no stub may send in its name."""
        self._local.add(url)

    def remove_local_address(self, url: str) -> None:
        self._local.discard(url)

    # -- the API: hyperties, load, unload, retry -------------------------------------------------

    async def new_hyperty(self, handler: Callable[[Message], Any] | None = None) -> Hyperty:
        """A new ``hyperty://<domain>/<id>`` allocated by the home domain's message node.

        The home stub is deployed on demand by the allocation request itself (the seed's "deployment of a
        Hyperty" trigger).  ``handler`` gets incoming messages; a non-None return value answers with 200.
        """
        return await allocate_hyperty(self, handler)

    async def load_stub(self, reference: str) -> StubHandle:
        """Deploy the stub of a domain (or named by a catalogue URL) and wait until it is ``live``.

        A stub that is already live is returned at once; one being deployed is waited for (every caller
        shares one deployment).  Raises :class:`StubDeploymentError` with the reason when it fails.
        """
        domain, name = address.split_stub_reference(reference)
        slot = self._slots.get(domain)
        if slot is None:
            slot = self._new_slot(domain, name, reference)
            self._start(slot)
        elif slot.name != name:
            raise StubDeploymentError(
                domain, 409, f"stub {slot.name!r} already serves {domain}; unload it before loading {name!r}"
            )
        if slot.forwarding and slot.handle is not None:
            return slot.handle
        if slot.task is None:
            if slot.failure is not None and not self._may_retry(slot):
                raise slot.failure
            self._start(slot)
        return await asyncio.shield(slot.task)  # type: ignore[arg-type]

    async def unload_stub(self, domain: str) -> StubRecord:
        """Disconnect and remove the stub of ``domain``; waiting messages get ``503``."""
        slot = self._slots.pop(address.validate_domain(domain), None)
        if slot is None:
            raise StubDeploymentError(domain, 404, f"no stub is loaded for {domain}")
        await self._unload(slot, "stub unloaded")
        return slot.record

    async def retry_now(self, domain: str) -> StubHandle:
        """Forget crash history and backoff and deploy ``domain``'s stub again now (fresh from the catalogue)."""
        slot = self._slots.get(address.validate_domain(domain))
        if slot is None:
            return await self.load_stub(domain)
        if slot.forwarding and slot.handle is not None:
            return slot.handle
        if slot.task is not None and not slot.task.done():
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StubDeploymentError):
                await slot.task
        slot.crashes.clear()
        slot.attempt = 0
        slot.failure = None
        self._start(slot, refresh=True)
        return await asyncio.shield(slot.task)  # type: ignore[arg-type]

    # -- deployment ------------------------------------------------------------------------------

    def _deploy_on_demand(self, domain: str) -> str | None:
        """The registry's deployer hook (step 1 by "an attempt to communicate"): synchronous on purpose."""
        if self._closing:
            return None
        try:
            slot = self._new_slot(domain, "default", domain)
        except (RegistryError, address.AddressError) as exc:
            log.warning("cannot deploy on demand", domain=domain, error=str(exc))
            return None
        self._start(slot)
        return slot.record.url

    def _new_slot(self, domain: str, name: str, reference: str) -> _Slot:
        record = self.registry.register_stub(domain, name=name, descriptor_url=reference)
        slot = _Slot(self, domain, name, reference, record)
        self._slots[domain] = slot
        return slot

    def _start(self, slot: _Slot, *, refresh: bool = False, delay: float = 0.0) -> None:
        task = asyncio.get_running_loop().create_task(self._deployment(slot, refresh=refresh, delay=delay))
        slot.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)

    async def _deployment(self, slot: _Slot, *, refresh: bool, delay: float) -> StubHandle:
        if delay:
            self._notify("restart-scheduled", slot, delay_s=round(delay, 3))
            await asyncio.sleep(delay)
        record = slot.record
        if record.deployment != "deploying":
            self.registry.report(record, "deploying")
        slot.failure = None
        try:
            handle = await self._deploy(slot, refresh=refresh)
        except StubDeploymentError as failure:
            await self._fail(slot, failure)
            raise
        except asyncio.CancelledError:
            await self._discard_component(slot)
            raise
        finally:
            if slot.task is asyncio.current_task():
                slot.task = None
        slot.handle = handle
        slot.forwarding = True
        slot.supervised = True
        slot.live_since = time.monotonic()
        self._flush(slot)
        self._notify("live", slot, total_ms=round(handle.total_ms, 3), pid=slot.record.info.get("pid"))
        return handle

    async def _deploy(self, slot: _Slot, *, refresh: bool) -> StubHandle:
        record = slot.record
        handle = StubHandle(domain=slot.domain, url=record.url, record=record)
        started = time.perf_counter()
        deadline = time.monotonic() + self.config.deploy_timeout

        def step(name: str, seed: str, since: float, detail: str | None = None) -> float:
            now = time.perf_counter()
            handle.steps.append(Step(name, seed, (now - since) * 1000, detail))
            self._notify("step", slot, step=name, seed=seed, ms=round((now - since) * 1000, 3), detail=detail)
            return now

        mark = step("registry", "1-2, 6, 8", started, record.url)
        try:
            verified = await asyncio.wait_for(
                self.catalogue.fetch_stub(slot.reference, refresh=refresh), _left(deadline)
            )
        except CatalogueError as exc:
            raise StubDeploymentError(slot.domain, 503, f"{exc.code}: {exc.message}", cause=exc.code) from None
        except TimeoutError:
            raise StubDeploymentError(slot.domain, 504, "catalogue did not answer within the deploy timeout") from None
        descriptor = verified.descriptor
        handle.version, handle.signer, handle.catalogue_url = verified.version, verified.signer, verified.url
        handle.from_cache = verified.from_cache
        origin = "cache" if verified.from_cache else verified.url
        mark = step("catalogue", "3-4", mark, f"{descriptor.object_name} {verified.version} from {origin}")
        if not descriptor.is_python:
            raise StubDeploymentError(
                slot.domain, 501, f"stub language {descriptor.language!r} cannot run in a Python sandbox"
            )
        component = await self._instantiate(slot, verified, deadline)
        mark = step("sandbox", "5, 7, 9", mark, "+".join(active_layers(component.isolation)))
        self.registry.report(record, "deployed")
        await self._connect(slot, component, deadline)
        mark = step("connect", "10", mark)
        try:
            await self.registry.wait_for_status(record, ("live", "failed"), _left(deadline))
        except StatusTimeoutError:
            raise StubDeploymentError(
                slot.domain,
                504,
                f"stub did not go live within {self.config.deploy_timeout:g} s (status {record.status})",
            ) from None
        if record.connection != "live":
            reason = record.last_description() or "no reason given"
            raise StubDeploymentError(slot.domain, 503, f"stub failed to connect: {reason}")
        step("live", "11-12", mark)
        return handle

    async def _instantiate(self, slot: _Slot, verified: Any, deadline: float) -> Component:
        descriptor = verified.descriptor
        config = dict(descriptor.configuration)
        config["runtimeURL"] = self.runtime_url
        boundary = Boundary(
            runtime_url=self.runtime_url,
            runtime_domain=self.config.domain,
            stub_domain=slot.domain,
            is_local=self._local.__contains__,
        )
        holder: list[Component] = []
        try:
            component = await asyncio.wait_for(
                self.sandbox.deploy(
                    url=slot.record.url,
                    source=verified.source,
                    config=config,
                    classname=descriptor.source_classname,
                    limits=self.limits.narrowed(descriptor.sandbox_limits),
                    boundary=boundary,
                    on_message=self._from_stub,
                    on_exit=lambda reason: self._on_exit(slot, holder, reason),
                ),
                _left(deadline),
            )
        except DeployError as exc:
            raise StubDeploymentError(slot.domain, 503, f"stub failed to start: {exc.summary}") from None
        except (TimeoutError, SandboxError, ValueError) as exc:
            raise StubDeploymentError(slot.domain, 503, f"sandbox failed: {exc or type(exc).__name__}") from None
        holder.append(component)
        slot.component = component
        slot.record.isolation = component.isolation
        slot.record.counters = component.counters
        slot.record.info["pid"] = component.pid
        return component

    async def _connect(self, slot: _Slot, component: Component, deadline: float) -> None:
        credentials = self.identity.credentials_for(slot.domain)
        try:
            answer = await component.execute("connect", [credentials], timeout=_left(deadline))
        except TimeoutError:
            raise StubDeploymentError(
                slot.domain,
                504,
                f"stub did not go live within {self.config.deploy_timeout:g} s (its connect did not return)",
            ) from None
        except SandboxError as exc:
            reason = slot.record.last_description() or str(exc)
            raise StubDeploymentError(slot.domain, 503, f"stub stopped while connecting: {reason}") from None
        code = response_code(answer)
        if code is None or code >= 300:
            reason = error_description(answer.body) or f"code {code}"
            raise StubDeploymentError(slot.domain, 503, f"stub's connect failed: {reason}")

    async def _fail(self, slot: _Slot, failure: StubDeploymentError) -> None:
        """Record a failed deployment, answer everybody waiting, and decide when a retry is allowed."""
        await self._discard_component(slot)
        slot.failure = failure
        if failure.cause in VERIFICATION_FAILURES:
            slot.retry_at = math.inf  # the same bytes will fail the same way: only retry_now() tries again
        else:
            slot.retry_at = time.monotonic() + self._backoff(slot)
        self.registry.report(slot.record, "deployment-failed", failure.description)
        log.warning("stub deployment failed", domain=slot.domain, stub_url=slot.record.url, reason=failure.description)
        self._notify("deployment-failed", slot, code=failure.code, description=failure.description)
        self._drain(slot, failure.code, failure.description)
        if slot.supervised and failure.cause not in VERIFICATION_FAILURES and not self._closing:
            self._after_crash(slot, failure.description)  # a restart that failed counts as another crash

    async def _discard_component(self, slot: _Slot) -> None:
        component, slot.component = slot.component, None
        slot.forwarding = False
        if component is not None:
            with contextlib.suppress(Exception):
                await component.remove(grace=0.2)

    def _may_retry(self, slot: _Slot) -> bool:
        return not self._closing and time.monotonic() >= slot.retry_at

    def _backoff(self, slot: _Slot) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]; the attempt count then grows."""
        ceiling = min(self.config.backoff_cap, self.config.backoff_base * (2**slot.attempt))
        slot.attempt = min(slot.attempt + 1, 32)
        return random.uniform(0, ceiling)

    # -- crashes -----------------------------------------------------------------------------------

    def _on_exit(self, slot: _Slot, holder: list[Component], reason: str) -> None:
        """The stub's process ended (the sandbox already published ``failed`` with ``reason``)."""
        if not holder or slot.component is not holder[0] or self._closing:
            return
        slot.component = None
        slot.forwarding = False
        log.warning("stub crashed", domain=slot.domain, stub_url=slot.record.url, reason=reason)
        if slot.task is not None:
            return  # a deployment in flight sees the failed status and fails by itself
        self._after_crash(slot, reason)

    def _after_crash(self, slot: _Slot, reason: str) -> None:
        """Restart with backoff, or give up when the crash budget is spent."""
        now = time.monotonic()
        if slot.live_since is not None and now - slot.live_since >= self.config.stable_after:
            slot.attempt = 0  # it had been fine for a while: start the backoff from its base again
        slot.live_since = None
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > self.config.crash_window:
            slot.crashes.popleft()
        if len(slot.crashes) >= self.config.crash_budget:
            description = (
                f"stub crashed {len(slot.crashes)} times in {self.config.crash_window:g} s (last: {reason}); "
                "it stays failed until retry_now()"
            )
            slot.failure = StubDeploymentError(slot.domain, 503, description, cause="crash-loop")
            slot.retry_at = math.inf
            log.error(
                "stub crash loop: giving up", domain=slot.domain, stub_url=slot.record.url, crashes=len(slot.crashes)
            )
            self._notify("crash-loop", slot, reason=reason, crashes=len(slot.crashes))
            self._drain(slot, 503, description)
            return
        delay = self._backoff(slot)
        slot.record.restarts += 1
        self._notify("crashed", slot, reason=reason, restart_in_s=round(delay, 3))
        self._start(slot, delay=delay)

    # -- traffic ---------------------------------------------------------------------------------

    def _from_stub(self, msg: Message) -> None:
        """Everything the stub sends (already checked at the sandbox boundary) goes onto the bus."""
        try:
            self.bus.post(msg)
        except BusClosedError:
            pass

    def _flush(self, slot: _Slot) -> None:
        component = slot.component
        while slot.queue and component is not None and slot.forwarding:
            msg = slot.queue.popleft()
            if not component.post(msg):
                self.bus.reply_error(msg, 503, _channel_full(slot.domain))

    def _drain(self, slot: _Slot, code: int, description: str) -> None:
        while slot.queue:
            self.bus.reply_error(slot.queue.popleft(), code, description)

    async def _unload(self, slot: _Slot, reason: str) -> None:
        task, slot.task = slot.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StubDeploymentError):
                await task
        component, slot.component = slot.component, None
        slot.forwarding = False
        if component is not None:
            try:
                await component.remove(grace=self.config.remove_grace)
            except Exception as exc:
                log.error("removing stub failed", stub_url=slot.record.url, error=str(exc))
        slot.listener.remove()
        self._drain(slot, 503, f"stub for {slot.domain}: {reason}")
        with contextlib.suppress(RegistryError):
            self.registry.unregister_stub(slot.domain)
        self._notify("unloaded", slot, reason=reason)

    def _notify(self, event: str, slot: _Slot, **details: Any) -> None:
        if not self._observers:
            return
        payload = {"event": event, "domain": slot.domain, "stub_url": slot.record.url, **details}
        for observer in list(self._observers):
            try:
                observer(payload)
            except Exception as exc:
                log.error("runtime observer raised", exc_info=exc)


def _channel_full(domain: str) -> str:
    return f"stub for {domain} is not taking messages (its channel is full)"


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared deployment's exception as seen: its callers get it; nobody else needs the warning."""
    if not task.cancelled():
        task.exception()
