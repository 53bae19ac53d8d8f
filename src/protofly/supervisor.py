"""The Runtime UA's stub table and the performer of each stub's lifecycle: deploy, restart, fail, unload.

What to do with each domain's stub -- deploy, queue, forward, answer, restart, give up -- is decided by
its :class:`~protofly.supervision.StubLifecycle`, a machine without I/O; :class:`Supervisor` performs its
actions (spawning the deployment task, flushing or answering the port's queue, recording restarts and
crash loops, abandoning what a dead stub held) and feeds the machine the outcomes (deployed, failed,
crashed).  :class:`~protofly.runtime.Runtime` composes it with the registry, the bus and the deploy
pipeline, and routes messages to the stubs it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from protofly.admission import DeployAdmission
from protofly.boundary import BoundaryPolicy
from protofly.bus import MessageBus
from protofly.config import RuntimeConfig
from protofly.deploy import DeployPipeline, StubDeploymentError, StubHandle, Target
from protofly.events import CrashLoop, DeployFailed, EventStream, RestartScheduled, StubCrashed, StubLive, StubUnloaded
from protofly.log import get_logger
from protofly.message import Message
from protofly.registry import RegistryError, RuntimeRegistry
from protofly.sandbox import Component
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
    Policy,
    Refuse,
    Reject,
    StartDeploy,
    StubLifecycle,
    Unload,
)
from protofly.supervision import DeployFailed as DeployFailedEvent
from protofly.supervision import RestartScheduled as RestartAction
from protofly.tasks import TaskSet
from protofly.throttle import LogThrottle

__all__ = ["Supervisor"]

log = get_logger("protofly.runtime")


class Supervisor:
    """One runtime's supervised stubs by domain, and what their machines' actions do.

    ``registry`` and ``pipeline`` are given by :meth:`start` (the runtime opens them first); ``closing`` is
    set by the runtime when it closes, after which a stub's death is not acted on.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        bus: MessageBus,
        events: EventStream,
        sessions: SessionStore,
        admission: DeployAdmission,
        policy: Policy,
        boundary_policy: BoundaryPolicy,
        warnings: LogThrottle,
        clock: Callable[[], float],
        uniform: Callable[[float, float], float],
    ) -> None:
        self.config = config
        self.bus = bus
        self.events = events
        self.sessions = sessions
        self.admission = admission
        self.policy = policy
        self.boundary_policy = boundary_policy
        self.warnings = warnings
        self.clock = clock
        self.uniform = uniform
        self.stubs: dict[str, SupervisedStub] = {}
        self.pipeline: DeployPipeline | None = None
        self.closing = False
        self._registry: RuntimeRegistry | None = None
        self._tasks = TaskSet("runtime")

    def start(self, registry: RuntimeRegistry, pipeline: DeployPipeline) -> None:
        self._registry = registry
        self.pipeline = pipeline

    @property
    def registry(self) -> RuntimeRegistry:
        if self._registry is None:
            raise RuntimeError("the runtime is not started: use 'async with Runtime(...)'")
        return self._registry

    async def close(self) -> None:
        """Unload every stub (no process survives), then cancel what is left of the deployments."""
        self.closing = True
        await asyncio.gather(*(self.unload(stub, "runtime closed") for stub in list(self.stubs.values())))
        self.stubs.clear()
        await self._tasks.close()

    async def outcome(self, stub: SupervisedStub) -> StubHandle:
        if stub.task is None:
            failure = stub.machine.failure or Failure(503, f"stub for {stub.domain} is not being deployed")
            raise StubDeploymentError(stub.domain, failure.code, failure.description, cause=failure.cause)
        return await asyncio.shield(stub.task)

    def evict(self, stub: SupervisedStub) -> None:
        """Forget a failed stub (no process, no task) and answer its domain from the negative cache."""
        failure = stub.machine.failure or Failure(503, f"stub for {stub.domain} failed")
        self.admission.remember_failure(stub.domain, failure.code, failure.description)
        del self.stubs[stub.domain]
        stub.listener.remove()
        self.perform(stub, stub.machine.handle(Unload("evicted to make room for another domain")))
        with contextlib.suppress(RegistryError):
            self.registry.unregister_stub(stub.domain)
        self.events.emit(StubUnloaded(stub.domain, stub.record.url, "evicted after failing"))

    def incoming(self, stub: SupervisedStub, msg: Message) -> None:
        """A message at a stub's port that is not live: the machine says forward, hold or refuse."""
        self.perform(stub, stub.machine.handle(Incoming()), msg)

    def perform(self, stub: SupervisedStub, actions: list[Action], msg: Message | None = None) -> None:
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
            self.perform(stub, stub.machine.handle(DeployStarted()))
        if stub.record.deployment != "deploying":
            self.registry.report(stub.record, "deploying")
        target = Target(
            stub.domain,
            stub.reference,
            stub.record,
            on_message=stub.from_stub,
            on_exit=lambda component, reason: self._on_exit(stub, component, reason),
        )
        pipeline = self.pipeline
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
        self.perform(stub, stub.machine.handle(Deployed()))
        pid = stub.record.info.get("pid")
        self.events.emit(StubLive(stub.domain, stub.record.url, round(handle.total_ms, 3), pid))
        return handle

    def _deploy_failed(self, stub: SupervisedStub, error: StubDeploymentError) -> None:
        stub.record.info["cause"] = error.cause
        self.registry.report(stub.record, "deployment-failed", error.description)
        log.warning("stub deployment failed", domain=stub.domain, stub_url=stub.record.url, reason=error.description)
        self.events.emit(DeployFailed(stub.domain, stub.record.url, error.code, error.description))
        failure = Failure(error.code, error.description, error.cause)
        self.perform(stub, stub.machine.handle(DeployFailedEvent(failure)))
        # after the queue got its answer: what a dead instance held, or waits for through it
        self.sessions.abandon(stub.domain, f"the stub for {stub.domain} could not be restarted: {error.description}")

    def _on_exit(self, stub: SupervisedStub, component: Component, reason: str) -> None:
        """The stub's process ended (the sandbox already published ``failed`` with ``reason``)."""
        if stub.component is not component or self.closing:
            return
        stub.component = None
        log.warning("stub crashed", domain=stub.domain, stub_url=stub.record.url, reason=reason)
        if stub.record.connection != "failed":  # the sandbox's status on the stub's behalf may have been refused
            self.registry.report(stub.record, "failed", reason, source="runtime")
        self.perform(stub, stub.machine.handle(Crashed(reason)))  # in a deployment it fails by itself

    # -- stub table ------------------------------------------------------------------------------

    def new_stub(self, domain: str, name: str, reference: str) -> SupervisedStub:
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
            on_idle_message=self.incoming,
            save_state=self.sessions.save,
        )
        self.stubs[domain] = stub
        return stub

    async def cancel_deploy(self, stub: SupervisedStub) -> None:
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

    async def unload(self, stub: SupervisedStub, reason: str) -> None:
        await self.cancel_deploy(stub)
        component, stub.component = stub.component, None
        if component is not None:
            try:
                await component.remove(grace=self.config.remove_grace)
            except Exception as exc:
                log.error("removing stub failed", stub_url=stub.record.url, error=str(exc))
        stub.listener.remove()
        self.perform(stub, stub.machine.handle(Unload(reason)))
        self.sessions.abandon(stub.domain, f"the stub for {stub.domain} was unloaded: {reason}")
        with contextlib.suppress(RegistryError):
            self.registry.unregister_stub(stub.domain)
        self.events.emit(StubUnloaded(stub.domain, stub.record.url, reason))
