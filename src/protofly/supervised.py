"""One domain's stub as the Runtime UA holds it: its lifecycle machine, record, port, boundary and process.

The runtime (:mod:`protofly.runtime`) performs what the lifecycle decides; this object carries the per-stub
state it acts on, and the two hot paths that must not pay for an action list: a message for a live stub
goes straight into its channel, and a message from the stub goes through the trust boundary onto the bus.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from protofly.boundary import BoundaryPolicy, StubBoundary
from protofly.bus import BusClosedError, MessageBus
from protofly.deploy import StubHandle
from protofly.message import Message
from protofly.port import StubPort
from protofly.record import StubRecord
from protofly.registry import RuntimeRegistry
from protofly.sandbox import Component
from protofly.supervision import Phase, StubLifecycle
from protofly.throttle import LogThrottle

__all__ = ["SupervisedStub"]


class SupervisedStub:
    """One domain's stub: machine, record, port, boundary, component and the deployment task in flight."""

    def __init__(
        self,
        domain: str,
        name: str,
        reference: str,
        record: StubRecord,
        *,
        bus: MessageBus,
        registry: RuntimeRegistry,
        lifecycle: StubLifecycle,
        queue_limit: int,
        boundary_policy: BoundaryPolicy,
        warnings: LogThrottle,
        clock: Callable[[], float],
        on_idle_message: Callable[[SupervisedStub, Message], None],
        save_state: Callable[[str, Message], None],
    ) -> None:
        self.domain = domain
        self.name = name
        self.reference = reference
        self.record = record
        self.machine = lifecycle
        self.port = StubPort(bus, domain, queue_limit)
        self.component: Component | None = None
        self.task: asyncio.Task[StubHandle] | None = None
        self.handle: StubHandle | None = None
        self.boundary = StubBoundary(
            record, bus=bus, registry=registry, policy=boundary_policy, warnings=warnings, clock=clock
        )
        self._admit = self.boundary.admit
        self._state_url = f"{record.url}/state"
        self._save_state = save_state
        self._idle = on_idle_message
        self._remember_return = registry.remember_return
        self._post = bus.post
        self.listener = bus.add_listener(record.url, self.on_message)

    @property
    def live(self) -> bool:
        return self.machine.phase is Phase.LIVE and self.component is not None

    def on_message(self, msg: Message) -> None:
        """The stub's port on the bus: a live stub takes the message now, else the lifecycle decides."""
        component = self.component
        if component is not None and self.machine.phase is Phase.LIVE:
            if not component.post(msg):
                self.port.forward_failed(msg)
            return
        self._idle(self, msg)

    def from_stub(self, msg: Message) -> None:
        """What the stub sends: through the trust boundary (:mod:`protofly.boundary`), then onto the bus."""
        if msg.to == self._state_url:  # ProtoStub.save_state: kept for this domain's next stub, not posted
            self._save_state(self.domain, msg)
            return
        if not self._admit(msg):
            return
        if msg.type != "response":
            self._remember_return(msg, self.record.url)  # its answer goes back the same way
        try:
            self._post(msg)
        except BusClosedError:
            pass
