"""The address table: which session every allocated (or bound on the fly) address routes to.

It owns the ``address -> session`` map and keeps it in step with each session's own sets
(``Session.addresses``, ``Session.keys``, ``Session.bound``).  Requests are parsed here too, and refused
with :class:`~protofly.msgnode.actions.Refused`; the core turns that into the answer.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

from protofly.message import Message
from protofly.msgnode.actions import Refused
from protofly.msgnode.session import Session

__all__ = ["AddressTable"]

_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,31}\Z")
#: Schemes a session may not allocate: they name runtimes and node/domain infrastructure.
_RESERVED_SCHEMES = frozenset({"hyperty-runtime", "runtime", "domain", "global", "mn", "user", "user-guid"})


class AddressTable:
    """Allocations, deallocations and on-the-fly bindings of one node's domain.

    ``max_addresses`` caps a session's allocated addresses, ``max_block`` one request, ``max_bound`` the
    foreign hyperties bound on the fly (least recently used evicted first), so that one runtime cannot grow
    the node's tables without bound.
    """

    __slots__ = (
        "_counters",
        "_new_id",
        "_owner",
        "domain",
        "hyperty_url",
        "max_addresses",
        "max_block",
        "max_bound",
        "object_url",
    )

    def __init__(
        self,
        domain: str,
        *,
        hyperty_url: str,
        object_url: str,
        max_addresses: int,
        max_block: int,
        max_bound: int,
        new_id: Callable[[], str],
        counters: dict[str, int],
    ) -> None:
        self.domain = domain
        self.hyperty_url = hyperty_url
        self.object_url = object_url
        self.max_addresses = max_addresses
        self.max_block = max_block
        self.max_bound = max_bound
        self._new_id = new_id
        self._counters = counters
        self._owner: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def items(self) -> Iterator[tuple[str, Session]]:
        return iter(self._owner.items())

    def owner(self, address: str) -> Session | None:
        return self._owner.get(address)

    # -- allocation ---------------------------------------------------------------------------------

    def allocate(self, session: Session, msg: Message) -> dict[str, Any]:
        """Allocate the addresses ``msg`` asks for; the ``value`` of the ``200``.

        ``value.addresses`` (with an ``allocationKey``) asks for those exact addresses again: a runtime
        whose session this node lost re-claims its hyperties' addresses on its new session.  Granted for
        addresses of this domain and scheme that no other session holds (see docs/msgnode.md).
        """
        asked = (msg.body or {}).get("value")
        if isinstance(asked, dict) and "addresses" in asked:
            scheme, _, key = self._allocation_request(msg)
            return self._reclaim(session, scheme, asked["addresses"], key)
        allocated, key = self.plan(session, msg)
        return self.grant(session, allocated, key)

    def plan(self, session: Session, msg: Message) -> tuple[list[str], str | None]:
        """Check an allocation request and name its new addresses (nothing is taken yet): a cluster's way."""
        scheme, number, key = self._allocation_request(msg)
        asked = (msg.body or {}).get("value")
        if isinstance(asked, dict) and "addresses" in asked:
            raise Refused(
                501, "body.value.addresses: a clustered node does not re-claim addresses (re-open the session)"
            )
        if len(session.addresses) + number > self.max_addresses:
            raise Refused(
                403,
                f"number: this session holds {len(session.addresses)} addresses and may "
                f"hold at most {self.max_addresses}",
            )
        prefix = f"{scheme}://{self.domain}/"
        return [prefix + self._new_id() for _ in range(number)], key

    def grant(self, session: Session, allocated: list[str], key: str | None) -> dict[str, Any]:
        """Give ``allocated`` (planned by :meth:`plan`) to ``session``; the ``value`` of the ``200``."""
        number = len(allocated)
        session.addresses.update(allocated)
        for address in allocated:
            self._owner[address] = session
        if key is not None:
            session.keys.setdefault(key, []).extend(allocated)
        self._counters["addresses_allocated"] += number
        value: dict[str, Any] = {"allocated": allocated}
        if key is not None:
            value["allocationKey"] = key
        return value

    def _reclaim(self, session: Session, scheme: str, requested: Any, key: str | None) -> dict[str, Any]:
        if key is None:
            raise Refused(400, "body.value.allocationKey: required to re-claim addresses")
        if (
            not isinstance(requested, list)
            or not requested
            or len(requested) > self.max_block
            or not all(isinstance(a, str) for a in requested)
        ):
            raise Refused(400, f"body.value.addresses: expected a list of 1 to {self.max_block} addresses")
        prefix = f"{scheme}://{self.domain}/"
        for address in requested:
            rest = address.removeprefix(prefix)
            if rest == address or not rest or "/" in rest:
                raise Refused(400, f"body.value.addresses: {address} is not a {scheme} address of {self.domain}")
            owner = self._owner.get(address)
            if owner is not None and owner is not session:
                raise Refused(409, f"body.value.addresses: {address} is allocated to another session")
        new = [a for a in requested if a not in session.addresses]
        if len(session.addresses) + len(new) > self.max_addresses:
            raise Refused(403, f"addresses: this session may hold at most {self.max_addresses} addresses")
        for address in new:
            session.addresses.add(address)
            session.bound.pop(address, None)
            self._owner[address] = session
        block = session.keys.setdefault(key, [])
        block.extend(a for a in requested if a not in block)
        self._counters["addresses_allocated"] += len(new)
        return {"allocated": list(requested), "allocationKey": key}

    def _allocation_request(self, msg: Message) -> tuple[str, int, str | None]:
        """``(scheme, number, allocationKey)`` from either the spec layout (``body.value``) or a flat body."""
        body = msg.body or {}
        value = body.get("value")
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            raise Refused(400, f"body.value: expected an object, got {type(value).__name__}")

        def field(name: str) -> Any:
            return value[name] if name in value else body.get(name)

        number = field("number")
        if number is None:
            number = 1
        if type(number) is not int or not 1 <= number <= self.max_block:
            raise Refused(400, f"body.value.number: expected an integer from 1 to {self.max_block}, got {number!r}")
        key = field("allocationKey")
        if key is not None and (not isinstance(key, str) or not key):
            raise Refused(400, "body.value.allocationKey: expected a non-empty string")
        if msg.to == self.hyperty_url:
            return "hyperty", number, key  # this endpoint ignores any scheme, as reTHINK
        scheme = field("scheme")
        if scheme is None:
            if msg.to == self.object_url:
                raise Refused(400, "body.scheme: required for object allocation (e.g. 'comm', 'ctxt')")
            scheme = "hyperty"
        if not isinstance(scheme, str) or not _SCHEME.match(scheme):
            raise Refused(400, f"body.scheme: {scheme!r} is not a URL scheme (lower case letters, digits, +.-)")
        if scheme in _RESERVED_SCHEMES or scheme.startswith("domain-"):
            raise Refused(400, f"body.scheme: {scheme!r} is reserved and cannot be allocated")
        return scheme, number, key

    def deallocate(self, session: Session, msg: Message) -> list[str]:
        """Free what ``msg`` names (an allocationKey, an address, ``childrenResources``); the freed addresses."""
        body = msg.body or {}
        resource = body.get("resource")
        children = body.get("childrenResources")
        if resource is None and children is None:
            raise Refused(
                400, "body.resource (an allocationKey or address) or body.childrenResources is required to deallocate"
            )
        freeing: list[str] = []
        keys: list[str] = []
        if resource is not None:
            if not isinstance(resource, str):
                raise Refused(400, "body.resource: expected a string")
            if resource in session.keys:
                keys.append(resource)
                freeing.extend(session.keys[resource])
            elif resource in session.addresses:
                freeing.append(resource)
            else:
                raise Refused(
                    404, f"body.resource: {resource} is neither an allocationKey nor an address of this session"
                )
        if children is not None:
            if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
                raise Refused(400, "body.childrenResources: expected a list of addresses")
            unknown = [c for c in children if c not in session.addresses]
            if unknown:
                raise Refused(
                    404,
                    f"body.childrenResources: {unknown[0]} is not an address of this "
                    f"session ({len(unknown)} unknown, nothing freed)",
                )
            freeing.extend(children)
        return self._free(session, freeing, keys)

    def _free(self, session: Session, addresses: list[str], keys: list[str]) -> list[str]:
        freed: list[str] = []
        for address in addresses:
            if address in session.addresses:
                session.addresses.discard(address)
                if self._owner.get(address) is session:
                    del self._owner[address]
                freed.append(address)
        for key in keys:
            session.keys.pop(key, None)
        if freed:
            gone = set(freed)
            for key, block in list(session.keys.items()):
                remaining = [a for a in block if a not in gone]
                if remaining:
                    session.keys[key] = remaining
                else:
                    del session.keys[key]
        self._counters["addresses_freed"] += len(freed)
        return freed

    def release(self, session: Session) -> int:
        """An ending session gives back everything it holds; the number of addresses that routed to it."""
        owner = self._owner
        freed = 0
        for address in itertools.chain(session.addresses, session.bound):
            if owner.get(address) is session:
                del owner[address]
                freed += 1
        self._counters["addresses_freed"] += len(session.addresses)
        session.addresses = set()
        session.keys = {}
        session.bound = {}
        return freed

    def forget(self, address: str) -> None:
        """Drop ``address`` from the routing map only (its session moved to another node of a cluster)."""
        self._owner.pop(address, None)

    def install(self, owner: dict[str, Session]) -> None:
        """Take the address map of a restore (checked by the snapshot loader) into the empty table."""
        self._owner.update(owner)

    # -- senders ------------------------------------------------------------------------------------

    def claim(self, session: Session, sender: str) -> bool:
        """May ``session`` send ``from: sender``?  Binds an unknown ``hyperty://`` sender to it on the way.

        This is the Vert.x transition handler: binding lets the reply to a foreign hyperty find its way
        back through the session it came from.  Bound addresses are capped per session, least recently
        used evicted first, so a peer that invents senders cannot grow the node's tables without bound.
        """
        owner = self._owner.get(sender)
        if owner is session:
            if sender in session.bound:  # refresh its place in the LRU order
                del session.bound[sender]
                session.bound[sender] = None
            return True
        if owner is None:
            if sender.startswith("hyperty://"):
                self._bind(session, sender)
            return True
        if sender in owner.bound:  # a foreign address moves to the session that last spoke for it
            del owner.bound[sender]
            self._bind(session, sender)
            return True
        return False

    def _bind(self, session: Session, address: str) -> None:
        bound = session.bound
        if len(bound) >= self.max_bound:
            oldest = next(iter(bound))
            del bound[oldest]
            del self._owner[oldest]
            self._counters["bound_evicted"] += 1
        bound[address] = None
        self._owner[address] = session
        self._counters["bound"] += 1
