"""Re-claiming the hyperties' addresses when the home message node lost the runtime's session.

A node with durable state (``msg-node --state-dir``) keeps sessions across a crash; a node that lost them
anyway (a new disk, another machine) answers the home stub's ``re-open`` with ``404``, the stub opens a
new session and reports ``live`` with "new session: ...".  Without more, every hyperty address of this
runtime is then unknown to the node and each message to it is answered ``404 not an allocated address``.

:class:`Rebinder` watches the event stream for that status of the home domain's stub and asks the node,
for every open hyperty, for its *same* address again (``create`` with ``value.addresses`` and the
hyperty's ``allocationKey``, a secret made at its first allocation).  A refusal (another session holds the
address) is logged with the hyperty's address; nothing else is changed.  Subscriptions are made again by
the message node stub itself, which saw them go out (``stubs/msgnode/stub.py``, ``_resubscribe``).
"""

from __future__ import annotations

from protofly.bus import MessageBus
from protofly.events import EventStream, RuntimeEvent, StatusChanged
from protofly.hyperty import Hyperty
from protofly.log import get_logger
from protofly.message import Message, error_description, response_code
from protofly.tasks import TaskSet

__all__ = ["NEW_SESSION", "Rebinder"]

#: How the message node stub describes a ``live`` on a session the node did not know.
NEW_SESSION = "new session"

log = get_logger("protofly.rebind")


class Rebinder:
    """Keeps the runtime's hyperties reachable across a message node that forgot their session."""

    def __init__(self, bus: MessageBus, events: EventStream, domain: str, request_timeout: float) -> None:
        self.bus = bus
        self.domain = domain
        self.request_timeout = request_timeout
        self._hyperties: dict[str, Hyperty] = {}
        self._tasks = TaskSet("rebind")
        self.counters = dict.fromkeys(("sessions_lost", "rebound", "refused"), 0)
        self._unsubscribe = events.subscribe(self._on_event)

    def add(self, hyperty: Hyperty) -> None:
        self._hyperties[hyperty.url] = hyperty

    def _on_event(self, event: RuntimeEvent) -> None:
        if not isinstance(event, StatusChanged) or event.domain != self.domain or event.value != "live":
            return
        if not (event.description or "").startswith(NEW_SESSION):
            return
        self.counters["sessions_lost"] += 1
        for url, hyperty in list(self._hyperties.items()):
            if hyperty.closed:
                del self._hyperties[url]
            else:
                self._tasks.spawn(self._rebind(hyperty))

    async def _rebind(self, hyperty: Hyperty) -> None:
        request = Message(
            type="create",
            from_=hyperty.allocation_sender,
            to=f"domain://msg-node.{self.domain}/address-allocation",
            body={
                "scheme": "hyperty",
                "value": {"number": 1, "addresses": [hyperty.url], "allocationKey": hyperty.allocation_key},
            },
        )
        answer = await self.bus.request(request, self.request_timeout)
        if response_code(answer) == 200:
            self.counters["rebound"] += 1
            log.info("hyperty address re-claimed on a new node session", hyperty=hyperty.url)
        else:
            self.counters["refused"] += 1
            log.error(
                "hyperty address could not be re-claimed",
                hyperty=hyperty.url,
                code=response_code(answer),
                reason=error_description(answer.body),
            )

    async def close(self) -> None:
        self._unsubscribe()
        await self._tasks.close()
