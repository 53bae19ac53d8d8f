"""Hyperties: the application's addresses on the reTHINK network.

A :class:`Hyperty` owns one ``hyperty://<domain>/<id>`` address allocated by its home domain's message node
(through the home stub, deployed on demand like any other).  It sends requests and events from that
address and hands incoming messages to one handler.  A handler that returns a value answers the request
with ``200`` and that value, so a service is one function; one that raises gets the sender a ``500``.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from protofly import address
from protofly.bus import Listener, MessageBus
from protofly.config import RuntimeConfig
from protofly.log import get_logger
from protofly.message import Message, error_description, response, response_code
from protofly.registry import RuntimeRegistry

__all__ = ["Hyperty", "HypertyError", "allocate_hyperty"]

log = get_logger("protofly.hyperty")

#: A hyperty's handler: gets each incoming message; a non-None return value answers it with 200.
Handler = Callable[[Message], "Any | Awaitable[Any]"]


class HypertyError(Exception):
    """A hyperty could not be created or used; the text says which address and why."""


class Hyperty:
    """One allocated hyperty address, with request/post helpers and an incoming-message handler."""

    def __init__(
        self,
        bus: MessageBus,
        registry: RuntimeRegistry,
        config: RuntimeConfig,
        url: str,
        handler: Handler | None = None,
        allocation_key: str | None = None,
    ) -> None:
        self.bus = bus
        #: The secret this address was allocated under: proves it is ours when a node that lost our session
        #: is asked for it again (``protofly.rebind``).
        self.allocation_key = allocation_key or secrets.token_urlsafe(16)
        #: Who asks the node for (and gives back) this address.
        self.allocation_sender = f"{registry.runtime_url}/address-allocation"
        self.registry = registry
        self.config = config
        self.url = url
        self._handler = handler
        self._listener: Listener | None = bus.add_listener(url, self._receive)
        registry.add_local(url)

    def on_message(self, handler: Handler | None) -> None:
        """Replace the handler of incoming messages (None: incoming requests get ``501``)."""
        self._handler = handler

    async def request(
        self, to: str, type: str = "execute", body: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Message:
        """Send a request from this hyperty and wait for the response (``408`` when none comes in time)."""
        self._check_open()
        return await self.bus.request(Message(type=type, from_=self.url, to=to, body=body), timeout)

    def post(self, to: str, type: str = "update", body: dict[str, Any] | None = None) -> Message:
        """Send a message without waiting for an answer; returns it (with the id the bus gave it)."""
        self._check_open()
        msg = Message(id=self.bus.allocate_id(self.url), type=type, from_=self.url, to=to, body=body)
        self.bus.post(msg)
        return msg

    async def close(self) -> None:
        """Stop receiving and give the address back to the message node."""
        if self._listener is None:
            return
        self._listener.remove()
        self._listener = None
        self.registry.remove_local(self.url)
        node = f"domain://msg-node.{self.config.domain}/address-allocation"
        release = Message(
            type="delete",
            from_=f"{self.registry.runtime_url}/address-allocation",
            to=node,
            body={"childrenResources": [self.url]},
        )
        answer = await self.bus.request(release, self.config.request_timeout)
        if response_code(answer) != 200:
            log.warning("address release failed", hyperty=self.url, reason=error_description(answer.body))

    @property
    def closed(self) -> bool:
        return self._listener is None

    def _check_open(self) -> None:
        if self._listener is None:
            raise HypertyError(f"hyperty {self.url} is closed")

    def _receive(self, msg: Message) -> Awaitable[None] | None:
        handler = self._handler
        if handler is None:
            if msg.type != "response":
                self.bus.reply_error(msg, 501, f"hyperty {self.url} has no handler")
            return None
        result = handler(msg)
        if result is None:  # a notification handled (the common case): nothing to answer or await
            return None
        if inspect.isawaitable(result):
            return self._answer_later(msg, result)
        self._answer(msg, result)
        return None

    async def _answer_later(self, msg: Message, pending: Awaitable[Any]) -> None:
        self._answer(msg, await pending)

    def _answer(self, msg: Message, value: Any) -> None:
        if value is None or msg.type == "response":
            return
        answer = value if isinstance(value, Message) else response(msg, 200, value=value)
        self.bus.post(answer)


async def allocate_hyperty(
    bus: MessageBus, registry: RuntimeRegistry, config: RuntimeConfig, handler: Handler | None = None
) -> Hyperty:
    """Ask the home domain's message node for a hyperty address (deploying the home stub if needed)."""
    domain = config.domain
    key = secrets.token_urlsafe(16)
    request = Message(
        type="create",
        from_=f"{registry.runtime_url}/address-allocation",
        to=f"domain://msg-node.{domain}/address-allocation",
        body={"scheme": "hyperty", "value": {"number": 1, "allocationKey": key}},
    )
    answer = await bus.request(request, config.deploy_timeout + config.request_timeout)
    code = response_code(answer)
    if code != 200:
        raise HypertyError(
            f"hyperty address allocation at {request.to} failed: {code} {error_description(answer.body)}"
        )
    try:
        url = (answer.body or {})["value"]["allocated"][0]
        parsed = address.parse(url)
    except (KeyError, IndexError, TypeError, address.AddressError) as exc:
        raise HypertyError(f"message node answered the allocation with no usable address ({exc!r})") from None
    if parsed.scheme != "hyperty" or address.serving_domain(url) != domain:
        raise HypertyError(f"message node allocated {url!r}, not a hyperty address of {domain}")
    return Hyperty(bus, registry, config, url, handler, allocation_key=key)
