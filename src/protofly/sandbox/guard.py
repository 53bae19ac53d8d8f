"""The boundary the runtime enforces on what a stub sends, shared by every sandbox.

The stub's process is untrusted, so these checks run on the runtime side of the channel, after framing:
a message whose ``from`` claims an address of the runtime's own (a local hyperty, the registry, another
stub) is dropped, counted and logged, so that a stub cannot impersonate local components.  The checks are
cheap for the common case (the stub's own URL, or a remote address of its domain).  Which rules of the
trust boundary are enforced here and which are planned: ``docs/architecture.md``, *The trust boundary*.
"""

from __future__ import annotations

from collections.abc import Callable

from protofly.address import AddressError, is_within, serving_domain
from protofly.log import get_logger
from protofly.message import Message
from protofly.sandbox import Boundary
from protofly.sandbox.channel import SANDBOX_EXTERNAL, SANDBOX_INTERNAL, FrameError

__all__ = ["COUNTER_NAMES", "Guard", "failed_status", "forgery", "new_counters"]

COUNTER_NAMES = (
    "messages_from_stub",
    "messages_to_stub",
    "oversized_frames",
    "invalid_frames",
    "forged_from",
    "dropped_to_stub",
    "log_lines_dropped",
    "forged_control",
    "egress_opened",
    "egress_refused",
)

_SANDBOX_SPACE = "hyperty-runtime://sandbox"
#: Senders a guard keeps as cleared (all forgotten at once when full).
MAX_CLEARED = 1024
#: Log every boundary violation up to this count, then one line per this many.
_LOG_FIRST = 10
_LOG_EVERY = 1000


def new_counters() -> dict[str, int]:
    return dict.fromkeys(COUNTER_NAMES, 0)


def forgery(boundary: Boundary, url: str, sender: str) -> str | None:
    """Why ``sender`` is not an address the stub at ``url`` may use, or None if it may."""
    if sender == url or sender == f"{url}/status":
        return None
    if is_within(sender, boundary.runtime_url):
        return "address within the runtime"
    if is_within(sender, _SANDBOX_SPACE) or sender in (SANDBOX_EXTERNAL, SANDBOX_INTERNAL):
        return "sandbox control address"
    if boundary.is_local is not None and boundary.is_local(sender):
        return "address of a local component"
    if boundary.stub_domain != boundary.runtime_domain:
        # A foreign domain's stub speaks only for its domain: the address must route back to this stub.
        # (The home domain's stub may relay other domains' senders: that is how other runtimes reach ours.)
        try:
            domain = serving_domain(sender)
        except AddressError:
            return "not a valid address"
        if domain == boundary.runtime_domain:
            return f"address of the runtime's domain {boundary.runtime_domain}"
        if domain != boundary.stub_domain:
            return f"address of {domain or 'no domain'}, which the stub of {boundary.stub_domain} does not serve"
    return None


def failed_status(url: str, reason: str) -> Message:
    """The status update a dead stub can no longer send itself."""
    return Message(
        type="update",
        from_=url,
        to=f"{url}/status",
        body={"value": "failed", "description": reason},
    )


class Guard:
    """Counts and checks messages crossing one component's boundary, then hands them on.

    ``on_message`` errors are the runtime's own bugs; they are logged and never break the channel.

    The ``from`` rule is decided once per sender, not once per message: a stub sends from a handful of
    addresses, so a sender that passed :func:`forgery` is kept in a small set.  Whether an address is a
    local component can change (a hyperty is created after a stub used its future address), so the set
    is emptied whenever the boundary's ``local_version`` changes, and it is not kept at all for a
    boundary whose ``is_local`` has no version.  A forged sender is never kept: each one is counted.
    """

    def __init__(
        self,
        url: str,
        boundary: Boundary,
        on_message: Callable[[Message], None],
        counters: dict[str, int] | None = None,
    ) -> None:
        self.url = url
        self.boundary = boundary
        self.on_message = on_message
        self.counters: dict[str, int] = counters if counters is not None else new_counters()
        self.log = get_logger("protofly.sandbox", stub_url=url)
        self._status_url = f"{url}/status"
        #: Senders that passed the ``from`` rule, valid while ``local_version()`` is ``_cleared_version``.
        self._cleared: set[str] = {url, self._status_url}
        self._local_version = boundary.local_version
        self._cleared_version = -1 if self._local_version is None else self._local_version()
        self._keep = boundary.is_local is None or boundary.local_version is not None

    def from_stub(self, msg: Message) -> None:
        """One message from the stub: boundary check, count, deliver."""
        counters = self.counters
        counters["messages_from_stub"] += 1
        sender = msg.from_
        cleared = self._cleared
        version = self._local_version
        if version is not None:
            current = version()
            if current != self._cleared_version:
                self._cleared_version = current
                cleared.clear()
                cleared.update((self.url, self._status_url))
        if sender not in cleared:
            reason = forgery(self.boundary, self.url, sender)
            if reason is None:
                if self._keep:
                    if len(cleared) >= MAX_CLEARED:
                        cleared.clear()
                        cleared.update((self.url, self._status_url))
                    cleared.add(sender)
            else:
                counters["forged_from"] += 1
                count = counters["forged_from"]
                if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
                    self.log.warning(
                        "dropped a message with a forged from",
                        sender=sender,
                        to=msg.to,
                        type=msg.type,
                        reason=reason,
                        forged_from=count,
                    )
                return
        try:
            self.on_message(msg)
        except Exception:
            self.log.exception("the runtime's on_message failed on a message from the stub", type=msg.type)

    def deliver(self, msg: Message) -> None:
        try:
            self.on_message(msg)
        except Exception:
            self.log.exception("the runtime's on_message failed on a message from the stub", type=msg.type)

    def frame_error(self, error: FrameError) -> None:
        key = "oversized_frames" if error.kind == "oversized" else "invalid_frames"
        self.counters[key] += 1
        count = self.counters[key]
        if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
            self.log.warning(
                "dropped a frame from the stub", kind=error.kind, size=error.size, error=error.description, count=count
            )
