"""The node's state as plain JSON-able data, for a lossless restart: export, and a checked import.

:func:`export` turns the sessions (allocations, bindings, subscriptions, buffered frames) into a versioned
document; :func:`load` checks such a document field by field and rebuilds the sessions, or raises
:class:`StateError` naming the field at fault.  No I/O here: the shell reads and writes the file
(``statefile.py``), the core installs what :func:`load` returns.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

import msgspec

from protofly.address import AddressError, parse
from protofly.msgnode.session import Session

__all__ = ["STATE_FORMAT", "STATE_VERSION", "StateError", "export", "load"]

#: ``format`` and ``version`` of a snapshot; :func:`load` refuses anything else (a newer version would be
#: misread, an older format does not exist).
STATE_FORMAT = "protofly-msgnode-state"
STATE_VERSION = 1


class StateError(ValueError):
    """A state snapshot that cannot be loaded; the text names the offending field."""


class _BufferedState(msgspec.Struct, omit_defaults=True):
    """One buffered frame: its text, or (a peer sent bytes that are not UTF-8) their base64."""

    data: str | None = None
    base64: str | None = None


class _NumberedState(_BufferedState, omit_defaults=True):
    """One numbered message of an ack session, not acknowledged yet."""

    seq: int = 0


class _SessionState(msgspec.Struct, omit_defaults=True, rename={"runtime_url": "runtimeURL"}):
    runtime_url: str
    token: str
    flags: dict[str, bool] = {}
    addresses: list[str] = []
    #: allocationKey -> the addresses of that block
    keys: dict[str, list[str]] = {}
    #: foreign hyperties bound on the fly, least recently used first
    bound: list[str] = []
    #: resource -> the sources subscribed to it
    subscriptions: dict[str, list[str]] = {}
    buffer: list[_BufferedState] = []
    #: acknowledged delivery: the last number received from the runtime, the last numbered for it, and
    #: what it has not acknowledged
    received: int = 0
    sent: int = 0
    unacked: list[_NumberedState] = []


class _State(msgspec.Struct):
    format: str
    version: int
    domain: str
    sessions: list[_SessionState]


def export(domain: str, sessions: Iterable[Session]) -> dict[str, Any]:
    """Everything a restarted node needs, as plain data that shares nothing with the live sessions."""
    state = _State(STATE_FORMAT, STATE_VERSION, domain, [_export(s) for s in sessions])
    snapshot: dict[str, Any] = msgspec.to_builtins(state)
    return snapshot


def load(snapshot: Any, domain: str) -> tuple[list[Session], dict[str, Session]]:
    """The sessions of a snapshot (all detached) and the address map they own; :class:`StateError` if bad."""
    try:
        state = msgspec.convert(snapshot, _State)
    except msgspec.ValidationError as exc:
        raise StateError(_state_error_text(exc)) from None
    if state.format != STATE_FORMAT:
        raise StateError(f"format: {state.format!r} is not a message node state ({STATE_FORMAT!r})")
    if state.version != STATE_VERSION:
        raise StateError(f"version: {state.version} is not supported (this node reads version {STATE_VERSION})")
    if state.domain != domain:
        raise StateError(f"domain: the state is of msg-node.{state.domain}, this node serves {domain}")
    urls: set[str] = set()
    runtimes: set[str] = set()
    sessions: list[Session] = []
    owner: dict[str, Session] = {}
    for index, saved in enumerate(state.sessions):
        session = _import(saved, f"sessions[{index}]", owner)
        if session.url in urls or session.runtime_url in runtimes:
            raise StateError(f"sessions[{index}].runtimeURL: a second session of {session.runtime_url}")
        urls.add(session.url)
        runtimes.add(session.runtime_url)
        sessions.append(session)
    return sessions, owner


def _text(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode(), None
    except UnicodeDecodeError:  # forwarded verbatim from a peer that sent invalid UTF-8
        return None, base64.b64encode(data).decode()


def _export(session: Session) -> _SessionState:
    buffer = [_BufferedState(*_text(data)) for data in session.buffer]
    unacked = [_NumberedState(*_text(data), seq=seq) for seq, data in session.numbered()]
    return _SessionState(
        runtime_url=session.runtime_url,
        token=session.token,
        flags={"drain": session.drain, "batch": session.batch, "ack": session.ack},
        addresses=sorted(session.addresses),
        keys={key: list(block) for key, block in session.keys.items()},
        bound=list(session.bound),
        subscriptions={resource: sorted(sources) for resource, sources in session.subscriptions.items()},
        buffer=buffer,
        received=session.received,
        sent=session.sent,
        unacked=unacked,
    )


def _import(saved: _SessionState, where: str, owner: dict[str, Session]) -> Session:
    """One saved session, checked field by field; its addresses are entered into ``owner``."""
    try:
        parse(saved.runtime_url)
    except AddressError as exc:
        raise StateError(f"{where}.runtimeURL: {exc}") from None
    if not saved.token or "/" in saved.token:
        raise StateError(f"{where}.token: expected a non-empty token without '/', got {saved.token!r}")
    session = Session(runtime_url=saved.runtime_url, token=saved.token, url=f"{saved.runtime_url}/{saved.token}")
    session.drain = saved.flags.get("drain", False)
    session.batch = saved.flags.get("batch", False)
    session.ack = saved.flags.get("ack", False)
    if saved.received < 0 or saved.sent < 0:
        raise StateError(f"{where}.received/sent: sequence numbers are never negative")
    session.received = saved.received
    session.sent = saved.sent
    for index, numbered in enumerate(saved.unacked):
        data = _frame(numbered, f"{where}.unacked[{index}]")
        expected = saved.sent - len(saved.unacked) + 1 + index
        if numbered.seq != expected or expected <= 0:
            raise StateError(f"{where}.unacked[{index}].seq: expected consecutive numbers ending at {saved.sent}")
        session.unacked.append(data)
        session.unacked_bytes += len(data)
    for name, addresses in (("addresses", saved.addresses), ("bound", saved.bound)):
        for address in addresses:
            try:
                parse(address)
            except AddressError as exc:
                raise StateError(f"{where}.{name}: {exc}") from None
            if address in owner:
                raise StateError(f"{where}.{name}: {address} belongs to two sessions (or twice to this one)")
            owner[address] = session
    session.addresses = set(saved.addresses)
    session.bound = dict.fromkeys(saved.bound)
    for key, block in saved.keys.items():
        stray = [a for a in block if a not in session.addresses]
        if not block or stray:
            raise StateError(
                f"{where}.keys.{key}: expected a non-empty block of this session's addresses"
                + (f", {stray[0]} is not one" if stray else "")
            )
        session.keys[key] = list(block)
    for resource, sources in saved.subscriptions.items():
        if not sources or not all(sources):
            raise StateError(f"{where}.subscriptions.{resource}: expected a non-empty list of sources")
        session.subscriptions[resource] = set(sources)
        session.subscription_count += len(session.subscriptions[resource])
    for index, entry in enumerate(saved.buffer):
        session.buffer.append(_frame(entry, f"{where}.buffer[{index}]"))
        session.buffer_bytes += len(session.buffer[-1])
    return session


def _frame(entry: _BufferedState, where: str) -> bytes:
    if (entry.data is None) == (entry.base64 is None):
        raise StateError(f"{where}: expected exactly one of 'data' and 'base64'")
    if entry.data is not None:
        return entry.data.encode()
    try:
        return base64.b64decode(entry.base64 or "", validate=True)
    except binascii.Error as exc:
        raise StateError(f"{where}.base64: {exc}") from None


def _state_error_text(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.sessions[0].token`" as "sessions[0].token: ..."."""
    text = str(exc)
    detail, sep, where = text.rpartition(" - at `")
    if sep:
        return f"{where.rstrip('`').removeprefix('$').lstrip('.') or 'state'}: {detail}"
    if text.startswith("Object missing required field `"):
        return f"{text.split('`')[1]}: missing required field"
    return f"state: {text}"
