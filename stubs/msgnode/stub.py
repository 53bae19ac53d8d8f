"""The protocol stub for protofly's message node (and any reTHINK Vert.x-protocol node).

Published as a stub package (``stubs/msgnode/``) and served by each domain's catalogue; the runtime never
imports it.  It runs in a sandbox process, so it imports only the standard library, ``msgspec``,
``websockets``, the stub SDK and two small protofly modules: :mod:`protofly.message` (the one frame decoder)
and :mod:`protofly.backoff`.

Two parts, as every stateful protocol in protofly:

* :class:`NodeSession`, the session protocol without I/O: events in (socket opened, frame received,
  socket closed, timer fired, message from the runtime), actions out (:class:`Status`, :class:`Wake`,
  :class:`AckLater`, :class:`Deliver`, :class:`Answer`, :class:`CloseSocket`, :class:`Retry`, :class:`Live`,
  :class:`Failed`).
  It owns the outbox, the ``open``/``re-open`` handshake with its fallback, the batching and drain
  extensions and the backoff, and is unit-tested without sockets;
* :class:`MsgNodeStub`, the asyncio shell: one WebSocket at a time, a reader loop, a writer task that sends
  whatever the session hands it, the open timer and the reconnection sleep, all owned by ``bus.spawn``.

The stub has no network of its own: its WebSocket runs over a socket the runtime opens for it
(``open_connection``, the SDK's one call for it), to the node URL its descriptor declares in ``egress``.

Configuration (descriptor ``configuration``; the runtime adds ``runtimeURL``), see :class:`Settings`.
Credentials given to ``connect`` may hold ``accessToken`` for the node's token authentication; the token
goes into the ``open`` body and nowhere else (never into a log, a status or a ``repr``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode
from websockets.protocol import State

from protofly.backoff import Backoff
from protofly.message import Message, MessageError, decode, decode_frame, encode, response, response_code
from protofly.stub import Bus, ProtoStub, summary

__all__ = [
    "SESSION",
    "AckLater",
    "Answer",
    "CloseSocket",
    "Deliver",
    "Failed",
    "Live",
    "MsgNodeStub",
    "NodeSession",
    "Retry",
    "SaveState",
    "Settings",
    "Status",
    "Wake",
    "close_description",
]

_log = logging.getLogger("protofly.stubs.msgnode")

#: The node's session manager (Vert.x ``SessionManager``): open, re-open, close, drain notices.
SESSION = "mn:/session"

#: Application close code (RFC 6455 §7.4.2) of protofly's node: the session was re-opened from another
#: connection.  A literal, not an import: this stub also speaks to other reTHINK nodes and imports no node code.
CLOSE_SESSION_TAKEN_OVER = 4000

#: Close codes in words, for statuses (reTHINK's Vert.x stub reports the same explanations).
CLOSE_CODES: dict[int, str] = {
    CloseCode.NORMAL_CLOSURE: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.UNSUPPORTED_DATA: "unsupported data",
    CloseCode.NO_STATUS_RCVD: "no status code received",
    CloseCode.ABNORMAL_CLOSURE: "abnormal closure, no close frame",
    CloseCode.INVALID_DATA: "invalid frame payload data",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.MANDATORY_EXTENSION: "mandatory extension missing",
    CloseCode.INTERNAL_ERROR: "internal server error",
    CloseCode.SERVICE_RESTART: "service restart",
    CloseCode.TRY_AGAIN_LATER: "try again later",
    CloseCode.BAD_GATEWAY: "bad gateway",
    CloseCode.TLS_HANDSHAKE: "TLS handshake failure",
    CLOSE_SESSION_TAKEN_OVER: "session taken over by another connection",
}

#: Splits a packed frame of this stub's own messages back into them (see :meth:`NodeSession.unsent`).
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
#: The node's numbered frames (ack extension): one ``[seq,m]``, or several packed in one array.
_numbered_one = msgspec.json.Decoder(tuple[int, Message])
_numbered_packed = msgspec.json.Decoder(list[tuple[int, Message]])


def close_description(code: int | None, reason: str | None = None) -> str:
    """``"1001 (going away): message node shutting down"``: the status description of a lost socket."""
    if code is None:
        code = CloseCode.ABNORMAL_CLOSURE
    words = CLOSE_CODES.get(code, "unknown reason")
    text = f"{code} ({words})"
    return f"{text}: {reason}" if reason else text


#: Container allocations between two young-generation collections in this stub's process (CPython: 700).
GC_THRESHOLD = (20_000, 20, 20)


def tune_gc() -> None:
    """This process's garbage collector, set for a message relay (the sandbox runs one stub per process).

    Every message through the stub allocates a few short-lived containers (the decoded message, its body);
    at CPython's default a young-generation collection walks them every 700 allocations (about 0.4 us per
    message for the two stubs of a one-way flow, docs/benchmarks.md).  Only a collector still at that
    default is changed: a process that tuned its own (a runtime hosting the stub in-process) keeps it.
    """
    if gc.get_threshold()[0] == _CPYTHON_THRESHOLD:
        gc.set_threshold(*GC_THRESHOLD)


_CPYTHON_THRESHOLD = 700


# -- configuration -----------------------------------------------------------------------------------


#: Configuration keys: camelCase, as in reTHINK descriptors (and ``runtimeURL`` as the runtime spells it).
_KEYS = {
    "url": "url",
    "urls": "urls",
    "runtime_url": "runtimeURL",
    "outbox_messages": "outboxMessages",
    "outbox_bytes": "outboxBytes",
    "backoff_base": "backoffBase",
    "backoff_cap": "backoffCap",
    "batch": "batch",
    "batch_bytes": "batchBytes",
    "drain": "drain",
    "ack": "ack",
    "ack_delay": "ackDelay",
    "ack_every": "ackEvery",
    "ack_every_bytes": "ackEveryBytes",
    "open_timeout": "openTimeout",
    "max_message": "maxMessage",
    "ping_interval": "pingInterval",
}


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename=_KEYS):
    """The stub's knobs, read from the descriptor's ``configuration`` (camelCase keys, JSON types).

    ``url`` is required (``ws://`` or ``wss://``); everything else has a default that suits a node on the
    same machine or network.  :meth:`load` validates while it decodes: a bad value raises ``ValueError``
    naming the key, so the deployment fails with a reason instead of a stub that misbehaves later.
    """

    url: Annotated[str, Meta(pattern=r"^wss?://")]
    #: The other nodes of the domain's cluster: a lost connection is retried at the next URL of
    #: ``[url, *urls]`` (round robin), where ``re-open`` claims the session from the cluster.
    urls: list[Annotated[str, Meta(pattern=r"^wss?://")]] = []
    runtime_url: Annotated[str, Meta(min_length=1)]
    outbox_messages: Annotated[int, Meta(ge=1)] = 100_000
    outbox_bytes: Annotated[int, Meta(ge=1)] = 256 << 20
    backoff_base: Annotated[float, Meta(ge=0.0)] = 0.1
    backoff_cap: Annotated[float, Meta(ge=0.001)] = 5.0
    batch: bool = True
    batch_bytes: Annotated[int, Meta(ge=2)] = 256 << 10
    drain: bool = True
    ack: bool = True
    #: Delayed acks: an ack waits up to ``ack_delay`` seconds for a frame going to the node to ride with (0:
    #: at once), unless ``ack_every`` messages or ``ack_every_bytes`` bytes came since the last one -- a quarter
    #: of the node's window for a session (10,000 messages, 8 MiB), so the node never answers 503 for it.
    ack_delay: Annotated[float, Meta(ge=0.0)] = 0.02
    ack_every: Annotated[int, Meta(ge=1)] = 2_500
    ack_every_bytes: Annotated[int, Meta(ge=1)] = 2 << 20
    open_timeout: Annotated[float, Meta(ge=0.001)] = 3.0
    max_message: Annotated[int, Meta(ge=64)] = 1 << 20
    ping_interval: Annotated[float, Meta(ge=0.0)] = 20.0

    #: What a bad ``url`` or ``runtimeURL`` means, in the words of the deployment's operator.
    _WHAT: ClassVar[dict[str, str]] = {
        "url": "expected the node's ws:// or wss:// URL",
        "urls": "expected a list of the cluster's other ws:// or wss:// node URLs",
        "runtimeURL": "missing (the runtime adds it when it deploys the stub)",
    }

    def __post_init__(self) -> None:
        if self.backoff_cap < self.backoff_base:
            raise ValueError(
                f"configuration.backoffCap ({self.backoff_cap}) is below backoffBase ({self.backoff_base})"
            )

    @classmethod
    def load(cls, config: Mapping[str, Any]) -> Settings:
        """Decode and check ``config``; ``ValueError("configuration.<key>: ...")`` if it is not right."""
        try:
            return msgspec.convert(dict(config), cls)
        except msgspec.ValidationError as exc:
            raise ValueError(cls._error_text(str(exc), config)) from None

    @classmethod
    def _error_text(cls, text: str, config: Mapping[str, Any]) -> str:
        """msgspec's "Expected `int` >= 1 - at `$.outboxMessages`" in the stub's words, naming the key."""
        detail, sep, where = text.rpartition(" - at `$.")
        if sep:
            key = where.rstrip("`").split("[", 1)[0]  # urls[1] -> urls
        elif text.startswith("Object missing required field `"):
            key = text.split("`")[1]
        else:
            return text  # a check of __post_init__, already in these words
        value = config.get(key)
        if key in cls._WHAT:
            return f"configuration.{key}: {cls._WHAT[key]}, got {value!r}"
        kind = _field_types().get(key)
        if isinstance(kind, msgspec.inspect.BoolType):
            return f"configuration.{key}: expected true or false, got {value!r}"
        if isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType) and not detail.endswith(
            ("got `float`", "got `str`", "got `bool`", "got `null`", "got `array`", "got `object`")
        ):
            return f"configuration.{key}: must be at least {kind.ge}, got {value!r}"
        expected = "an integer" if isinstance(kind, msgspec.inspect.IntType) else "a number"
        return f"configuration.{key}: expected {expected}, got {value!r}"


@functools.cache
def _field_types() -> dict[str, msgspec.inspect.Type]:
    """The type (with its constraints) of every configuration key, for error texts (worked out at the first
    error, not at every start: it costs a millisecond)."""
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.encode_name: field.type for field in info.fields}


# -- actions ----------------------------------------------------------------------------------------
# msgspec Structs rather than dataclasses: a dataclass writes and compiles its methods when its class is
# made (~0.3 ms each), and every deploy runs this module afresh; a Struct's class costs microseconds.


class Status(msgspec.Struct, frozen=True):
    """Publish a connection status (``in-progress``, ``live``, ``disconnected``, ``failed``)."""

    value: str
    description: str | None = None


class Wake(msgspec.Struct, frozen=True):
    """There are frames to write: the shell's writer should call :meth:`NodeSession.next_frame`."""


class AckLater(msgspec.Struct, frozen=True):
    """An ack is owed but may wait: unless a timer runs already, call :meth:`NodeSession.ack_timer` in ``delay`` s."""

    delay: float


class Deliver(msgspec.Struct, frozen=True):
    """Messages from the node for the runtime, in order (the shell stamps ``via`` and posts them)."""

    messages: list[Message]

    def __repr__(self) -> str:  # the count, not the content (bodies may be large or private)
        return f"Deliver({len(self.messages)} messages)"


class Answer(msgspec.Struct, frozen=True):
    """An error response to a runtime sender whose message the stub cannot carry."""

    message: Message

    def __repr__(self) -> str:
        return f"Answer({self.message.body!r})"


class CloseSocket(msgspec.Struct, frozen=True):
    """Close the WebSocket (the session reports the outcome when :meth:`NodeSession.closed` is called)."""

    code: int
    reason: str


class Retry(msgspec.Struct, frozen=True):
    """Connect again after ``delay`` seconds (capped exponential backoff with full jitter)."""

    delay: float

    def __repr__(self) -> str:
        return f"Retry({self.delay:.3f})"


class Live(msgspec.Struct, frozen=True):
    """The handshake succeeded; ``fresh`` when a new session replaced one the node had forgotten."""

    fresh: bool


class Failed(msgspec.Struct, frozen=True):
    """The node refused the session for good (authentication, a malformed open): stop reconnecting."""

    description: str


class SaveState(msgspec.Struct, frozen=True):
    """Hand the runtime what a restarted stub needs to take this session over (``ProtoStub.save_state``).

    ``state`` is the session URL and the last number received from the node; ``handed_over`` how many of
    the messages the runtime handed to this stub are done with (acknowledged by the node, or answered).
    """

    state: dict[str, Any]
    handed_over: int


Action = Status | Wake | AckLater | Deliver | Answer | CloseSocket | Retry | Live | Failed | SaveState

# phases of NodeSession
IDLE = "idle"  # no socket (before the first connect, or between attempts)
OPENING = "opening"  # socket open, open/re-open sent, waiting for its answer
LIVE = "live"  # session granted: the outbox flows
DRAINING = "draining"  # the node is stopping gracefully: nothing more is sent after 'drained'
CLOSING = "closing"  # disconnect() sent 'close': waiting for the socket to go
STOPPED = "stopped"  # disconnected on request, or refused for good: no reconnection

#: Ids of the subscriptions the stub sends again on a new session, and how many resources it remembers.
_RESUBSCRIBE = "resubscribe-"
_MAX_RESUBSCRIBE = 10_000

#: Open refusals that another attempt cannot fix (the credentials or the request are wrong).
_PERMANENT = frozenset({400, 401, 403})


#: Frames the writer hands to the socket in one write (``_Connection``): an ack and the frame it rides
#: with, or a few small frames; bounded so a large outbox is not joined into one huge buffer.
_GROUP_BYTES = 64 << 10


# -- the session protocol, sans I/O ------------------------------------------------------------------


class NodeSession:
    """One runtime's session with one message node, across any number of sockets.

    The outbox holds encoded messages (``via`` already stamped) from the moment the runtime hands them over
    until they are written: while the socket is down, opening, or the node drains, they wait, in order,
    bounded by ``outbox_messages`` and ``outbox_bytes``; a message that does not fit is answered ``503``
    at once (``413`` if it could never be sent).  Frames handed to the writer but not written (the socket
    went away first) are put back with :meth:`unsent`, so a message is lost only if the node accepted its
    bytes and then died without a graceful drain.
    """

    def __init__(
        self,
        settings: Settings,
        stub_url: str,
        *,
        rng: Callable[[float, float], float] = random.uniform,
        saved: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.stub_url = stub_url
        self.runtime_url = settings.runtime_url
        self.phase = IDLE
        #: ``<runtimeURL>/<runtimeToken>`` once the node granted a session; kept across sockets for re-open.
        self.session_url: str | None = None
        self.outbox: deque[bytes] = deque()
        self.outbox_size = 0
        #: Reconnection delays; reset by every ``live`` and by ``connect()``.
        self.backoff = Backoff(settings.backoff_base, settings.backoff_cap, rng)
        self.batch_granted = False
        self.drain_granted = False
        self.frame_limit = settings.batch_bytes
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "accepted",
                "sent",
                "frames_sent",
                "requeued",
                "received",
                "refused",
                "invalid",
                "opens",
                "reopens",
                "reopen_fallbacks",
                "drains",
                "disconnects",
                "duplicates",
                "resent",
                "acks",
                "resubscribed",
            ),
            0,
        )
        #: What the runtime subscribed to at the node: ``(sm URL, subscriber, source)`` -> resources.  Sent
        #: again on a new session (the node forgot the old one), so no subscription is lost with it.
        self.subscriptions: dict[tuple[str, str, str], set[str]] = {}
        #: Acknowledged delivery (docs/msgnode.md): granted on this socket; the last number sent and the
        #: sent messages the node has not acknowledged (numbered ``sent_seq - len(inflight) + 1`` ...
        #: ``sent_seq``: plain bytes, no per-message tuples for the garbage collector to walk); the last
        #: number received from the node; an ``ack`` to send.  Messages stay counted in ``outbox_size``
        #: until acknowledged.
        self.ack_granted = False
        self.sent_seq = 0
        self.inflight: deque[bytes] = deque()
        self.delivered = 0
        self._ack_due = False
        #: Delayed acks: a delivered number not acknowledged yet, waiting for a frame to ride with or for
        #: the timer (``AckLater``); messages and bytes received since the last ack (the thresholds).
        self._ack_owed = False
        self._ack_count = 0
        self._ack_bytes = 0
        #: How many messages the runtime handed over (``submit``); the hand-over number of every message
        #: still pending (outbox and in flight, in order), for :class:`SaveState`.
        self.handed = 0
        self._marks: deque[int] = deque()
        self._token: str | None = None
        self._control: deque[bytes] = deque()
        self._pending: tuple[int, str] | None = None  # (id, "open" | "re-open")
        self._why: str | None = None  # why the current socket is being closed, for the status
        self._ids = 0
        self._had_session = False
        #: live at least once since start(): before that a failure fails connect() instead of retrying
        self._established = False
        if saved:
            session = saved.get("session")
            received = saved.get("received")
            if isinstance(session, str) and session.startswith(self.runtime_url + "/"):
                self.session_url = session
                self._had_session = True
                self.delivered = received if type(received) is int and received >= 0 else 0

    def __repr__(self) -> str:  # never shows the access token
        return f"NodeSession(phase={self.phase!r}, session={self.session_url!r}, outbox={len(self.outbox)})"

    # -- the runtime's side ---------------------------------------------------------------------

    def set_credentials(self, credentials: Mapping[str, Any] | None) -> None:
        """Keep ``accessToken`` (if any) for every ``open`` from now on; other fields are not the node's."""
        if credentials is None:
            return
        token = credentials.get("accessToken")
        if token is not None and not isinstance(token, str):
            raise ValueError("credentials.accessToken: expected a string")
        self._token = token

    def start(self) -> None:
        """The runtime wants a connection (``connect``): leave ``stopped``, begin a fresh backoff."""
        if self.phase == STOPPED:
            self.phase = IDLE
        self.backoff.reset()
        self._established = False

    def submit(self, msg: Message) -> Answer | None:
        """Accept a message for the node (stamping ``body.via``), or say why not as an error response."""
        self.handed += 1
        if self.phase in (STOPPED, CLOSING):
            return self._refuse(msg, 503, f"the stub for {self.settings.url} is disconnected; connect() it first")
        body = msg.body
        if body is None:
            msg.body = {"via": self.stub_url}
        else:
            body["via"] = self.stub_url
        try:
            data = encode(msg)
        except (TypeError, msgspec.EncodeError) as exc:
            return self._refuse(msg, 400, f"body: not JSON-serialisable ({exc})")
        size = len(data)
        if size > self.settings.max_message:
            return self._refuse(
                msg, 413, f"size: message of {size} bytes is over the node's {self.settings.max_message}-byte limit"
            )
        if len(self.outbox) >= self.settings.outbox_messages or self.outbox_size + size > self.settings.outbox_bytes:
            return self._refuse(
                msg,
                503,
                f"the stub's outbox is full ({len(self.outbox)} messages, "
                f"{self.outbox_size} bytes) while the node is {self._state_words()}",
            )
        self.outbox.append(data)
        self.outbox_size += size
        if self.settings.ack:  # without acks nobody reports hand-overs: nothing to remember
            self._marks.append(self.handed)
        self.counters["accepted"] += 1
        if msg.type in ("subscribe", "unsubscribe") and msg.to.endswith("/sm"):
            self._note_subscription(msg)
        return None

    def _note_subscription(self, msg: Message) -> None:
        body = msg.body or {}
        resources = [r for key in ("resources", msg.type) for r in (body.get(key) or ()) if isinstance(r, str)]
        source = body.get("source")
        key = (msg.to, msg.from_, source if isinstance(source, str) else "")
        if msg.type == "subscribe":
            if sum(len(r) for r in self.subscriptions.values()) + len(resources) <= _MAX_RESUBSCRIBE:
                self.subscriptions.setdefault(key, set()).update(resources)
            return
        for (to, sender, src), held in list(self.subscriptions.items()):
            if to == msg.to and sender == msg.from_ and (not key[2] or src == key[2]):
                held.difference_update(resources)
                if not held:
                    del self.subscriptions[(to, sender, src)]

    def _resubscribe(self) -> None:
        """A new session: subscribe again to everything the runtime had subscribed to, before anything else."""
        mark = self.handed_over + 1
        for number, ((to, sender, source), resources) in enumerate(reversed(list(self.subscriptions.items()))):
            body: dict[str, Any] = {"resources": sorted(resources), "via": self.stub_url}
            if source:
                body["source"] = source
            data = encode(Message(id=f"{_RESUBSCRIBE}{number}", type="subscribe", from_=sender, to=to, body=body))
            self.outbox.appendleft(data)
            self.outbox_size += len(data)
            if self.settings.ack:
                self._marks.appendleft(mark)

    @property
    def handed_over(self) -> int:
        """Every message the runtime handed over up to this number is acknowledged or answered."""
        return self._marks[0] - 1 if self._marks else self.handed

    def saved_state(self) -> SaveState:
        state: dict[str, Any] = {"session": self.session_url, "received": self.delivered}
        return SaveState(state, self.handed_over)

    @property
    def can_send(self) -> bool:
        return self.phase == LIVE

    def next_frame(self) -> tuple[bytes, int] | None:
        """The next frame to write and how many outbox messages it carries (0: a session message).

        Session messages go first; outbox messages only while live, packed into JSON arrays of at most
        ``frame_limit`` bytes when the node granted batching, else one per frame as reTHINK nodes expect.
        """
        outbox = self.outbox
        if (
            (self._ack_due or (self._ack_owed and (self._control or (outbox and self.phase in (LIVE, CLOSING)))))
            and self.session_url is not None
            and self.phase in (LIVE, DRAINING, CLOSING)
        ):  # due, or owed and a frame goes now: it rides along, written just before it
            self._ack_due = self._ack_owed = False
            self._ack_count = self._ack_bytes = 0
            self.counters["acks"] += 1
            return self._session_message("update", self.session_url, {"ack": self.delivered}), 0
        if self._control and not (self.phase == CLOSING and outbox):  # 'close' goes after the outbox
            return self._control.popleft(), 0
        if self.phase not in (LIVE, CLOSING) or not outbox:
            return None
        if self.ack_granted:
            return self._numbered_frame()
        first = outbox.popleft()
        if not self.batch_granted or not outbox:
            self.outbox_size -= len(first)
            return first, 1
        parts = [first]
        size = len(first) + 2
        limit = self.frame_limit
        while outbox and size + len(outbox[0]) + 1 <= limit:
            data = outbox.popleft()
            parts.append(data)
            size += len(data) + 1
        self.outbox_size -= size - len(parts) - 1
        if len(parts) == 1:
            return first, 1
        return b"[" + b",".join(parts) + b"]", len(parts)

    def _numbered_frame(self) -> tuple[bytes, int]:
        """``[seq,m1,m2,...]``: outbox messages numbered and kept in flight until the node's ``ack``."""
        outbox = self.outbox
        limit = self.frame_limit if self.batch_granted else 0
        first = outbox.popleft()
        seq = self.sent_seq + 1
        parts = [first]
        size = len(first) + 24
        while outbox and size + len(outbox[0]) + 1 <= limit:
            data = outbox.popleft()
            parts.append(data)
            size += len(data) + 1
        self.inflight.extend(parts)
        self.sent_seq = seq + len(parts) - 1
        return b"[%d," % seq + b",".join(parts) + b"]", len(parts)

    def numbered_inflight(self) -> list[tuple[int, bytes]]:
        """The sent messages the node has not acknowledged, with their numbers (tests, diagnostics)."""
        return list(enumerate(self.inflight, self.sent_seq - len(self.inflight) + 1))

    def _released(self, seq: int, actions: list[Action]) -> None:
        """The node acknowledged everything up to ``seq``: forget it (and let the runtime know)."""
        inflight = self.inflight
        released = min(seq - (self.sent_seq - len(inflight)), len(inflight))
        if released > 0:
            size = 0
            popleft = inflight.popleft
            marks = self._marks.popleft
            for _ in range(released):
                size += len(popleft())
                marks()
            self.outbox_size -= size
            actions.append(self.saved_state())

    def _resync(self, received: int, actions: list[Action]) -> None:
        """After open/re-open: the node has everything up to ``received``; what is left goes again, in order."""
        self._released(received, actions)
        if self.inflight:
            self.counters["resent"] += len(self.inflight)
            self.outbox.extendleft(reversed(self.inflight))
            self.inflight.clear()
        self.sent_seq = received

    def written(self, count: int) -> None:
        """A frame carrying ``count`` outbox messages reached the socket."""
        self.counters["sent"] += count
        self.counters["frames_sent"] += 1
        if count and not self.ack_granted and self._marks:  # a node without acks: written is handed over
            marks = self._marks.popleft
            for _ in range(min(count, len(self._marks))):
                marks()

    def unsent(self, frame: bytes, count: int) -> None:
        """A frame from :meth:`next_frame` could not be written: put its messages back at the front."""
        if count == 0:
            if frame.endswith(b'"ack":%d}}' % self.delivered):
                self._ack_due = True  # an ack that did not go: the next socket sends it
            return  # a session message belongs to the socket that is gone
        self.counters["requeued"] += count
        if self.ack_granted:  # numbered: back from in flight to the outbox, numbers given back
            for _ in range(count):
                self.outbox.appendleft(self.inflight.pop())
            self.sent_seq -= count
            return
        if count == 1:
            parts = [frame]
        else:
            parts = [bytes(raw) for raw in _raw_list.decode(frame)]
        for data in reversed(parts):
            self.outbox.appendleft(data)
            self.outbox_size += len(data)

    def disconnect(self) -> list[Action]:
        """The runtime asked to disconnect: send what is queued, then ``close``; or stop where we are."""
        actions: list[Action] = []
        if self.phase == LIVE and self.session_url is not None:
            self._control.append(self._session_message("close", self.session_url))
            self.phase = CLOSING
            actions.append(Wake())
            return actions
        if self.phase == DRAINING:  # 'drained' was our last frame: let the node close the socket
            self.phase = CLOSING
            return self._refuse_outbox("the node is draining and the stub was asked to disconnect")
        self.phase = STOPPED
        self.session_url = None
        self._pending = None
        actions.extend(self._refuse_outbox("the stub was asked to disconnect before the node was reached"))
        return actions

    # -- the socket's side ----------------------------------------------------------------------

    def socket_opened(self) -> list[Action]:
        """A WebSocket is open: ask for the session (``re-open`` if we had one, else ``open``)."""
        self._control.clear()
        self._why = None
        self.batch_granted = False
        self.drain_granted = False
        self.ack_granted = False
        self._ack_due = self._ack_owed = False
        self._ack_count = self._ack_bytes = 0
        self.frame_limit = self.settings.batch_bytes
        self.phase = OPENING
        if self.session_url is not None:
            self._send_open("re-open", self.session_url)
        else:
            self._send_open("open", self.runtime_url)
        return [Status("in-progress"), Wake()]

    def received(self, data: bytes) -> list[Action]:
        """One text frame from the node: a message or (batching) an array of messages."""
        before = self.delivered
        messages = self._decode_numbered(data) if self.ack_granted and data[:1] == b"[" else self._decode(data)
        actions: list[Action] = []
        batch: list[Message] = []
        for msg in messages:
            if msg.from_ == SESSION:
                if batch:
                    actions.append(Deliver(batch))
                    batch = []
                self._session_event(msg, actions)
            elif self.phase in (LIVE, DRAINING, CLOSING):
                if msg.type == "response" and isinstance(msg.id, str) and msg.id.startswith(_RESUBSCRIBE):
                    self.counters["resubscribed"] += 1  # the answer to our own re-subscription: not the runtime's
                    continue
                batch.append(msg)
            else:
                self.counters["invalid"] += 1  # nothing but the session's answer may come before it
        if batch:
            actions.append(Deliver(batch))
        self.counters["received"] += sum(len(a.messages) for a in actions if type(a) is Deliver)
        if self.delivered != before:  # the runtime has them (in order, after the Deliver): tell both sides
            actions.append(self.saved_state())
            self._ack_count += self.delivered - before
            self._ack_bytes += len(data)
            settings = self.settings
            if (
                settings.ack_delay <= 0
                or self._ack_count >= settings.ack_every
                or self._ack_bytes >= settings.ack_every_bytes
            ):
                self._ack_due = True
                actions.append(Wake())
            elif not self._ack_owed:  # rides on the next frame to the node, or goes when the timer fires
                self._ack_owed = True
                actions.append(AckLater(settings.ack_delay))
        return actions

    def ack_timer(self) -> list[Action]:
        """The ``AckLater`` timer fired: an ack still owed goes now, alone."""
        if not self._ack_owed:
            return []
        self._ack_due = True
        return [Wake()]

    def _decode_numbered(self, data: bytes) -> list[Message]:
        """A frame of the ack extension: ``[seq,m...]``, or a packed array of such frames and plain messages.

        Numbered messages already delivered (a replay after a reconnection) are dropped here, by number.
        The common frames (``[seq,m]``, or the node's packing of them) are decoded in one call.
        """
        try:
            pairs = [_numbered_one.decode(data)] if data[1:2].isdigit() else _numbered_packed.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return self._decode_numbered_slowly(data)
        fresh: list[Message] = []
        for seq, msg in pairs:
            if seq <= self.delivered:
                self.counters["duplicates"] += 1
                continue
            self.delivered = seq
            fresh.append(msg)
        return fresh

    def _decode_numbered_slowly(self, data: bytes) -> list[Message]:
        """Item by item: a frame mixing plain and numbered messages, or with a bad element."""
        try:
            items = _raw_list.decode(data)
        except msgspec.DecodeError:
            self.counters["invalid"] += 1
            return []
        if items and bytes(items[0])[:1].isdigit():
            groups = [items]
        else:
            groups = []
            for item in items:
                raw = bytes(item)
                if raw[:1] == b"[":
                    try:
                        groups.append(_raw_list.decode(raw))
                    except msgspec.DecodeError:
                        self.counters["invalid"] += 1
                else:
                    groups.append([msgspec.Raw(b"0"), item])  # a plain message (number 0: never a duplicate)
        messages: list[Message] = []
        for group in groups:
            try:
                seq = int(bytes(group[0]))
            except ValueError:
                self.counters["invalid"] += 1
                continue
            for offset, raw in enumerate(group[1:]):
                if seq:
                    number = seq + offset
                    if number <= self.delivered:
                        self.counters["duplicates"] += 1
                        continue
                    self.delivered = number
                messages.extend(self._decode(bytes(raw)))
        return messages

    def open_timed_out(self) -> list[Action]:
        """No answer to ``open``/``re-open`` in time: give this socket up (reTHINK: "Timeout from mn:/session")."""
        if self.phase != OPENING:
            return []
        self._why = f"Timeout from {SESSION}: no answer within {self.settings.open_timeout:g} s"
        return [CloseSocket(CloseCode.NORMAL_CLOSURE, "no answer to open")]

    def connect_failed(self, description: str) -> list[Action]:
        """The socket could not be opened (refused, handshake failed, timed out)."""
        if self.phase == STOPPED:
            return []
        return self._lost(f"cannot reach the message node: {description}")

    def closed(self, code: int | None, reason: str | None) -> list[Action]:
        """The socket is gone (whoever closed it): report why and, unless stopped, retry with backoff."""
        previous = self.phase
        why, self._why = self._why, None
        self._control.clear()
        self._pending = None
        if previous == CLOSING:
            self.phase = STOPPED
            self.session_url = None
            return [Status("disconnected", close_description(code, reason))]
        if previous == STOPPED:
            return []
        self.counters["disconnects"] += 1
        description = why or close_description(code, reason)
        if previous == DRAINING:
            description += " (the node drained the session for a restart)"
        return self._lost(description)

    def _lost(self, description: str) -> list[Action]:
        """No session now: retry with backoff, or, if it never got live since connect(), fail that connect."""
        if not self._established:
            self.phase = STOPPED
            return [Status("failed", description), Failed(description), *self._refuse_outbox(description)]
        self.phase = IDLE
        return [Status("disconnected", description), self._retry()]

    # -- internals ------------------------------------------------------------------------------

    def _retry(self) -> Retry:
        """Full jitter (``protofly.backoff``): spreads the reconnections of every stub a node restart dropped."""
        return Retry(self.backoff.next())

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _session_message(self, kind: str, sender: str, body: dict[str, Any] | None = None) -> bytes:
        return encode(Message(id=self._next_id(), type=kind, from_=sender, to=SESSION, body=body))

    def _send_open(self, kind: str, sender: str) -> None:
        body: dict[str, Any] = {}
        if self.settings.batch:
            body["batch"] = True
        if self.settings.drain:
            body["drain"] = True
        if self.settings.ack:
            body["ack"] = True
            if kind == "re-open":
                body["received"] = self.delivered
        if kind == "open" and self._token is not None:
            body["accessToken"] = self._token
        msg_id = self._next_id()
        self._pending = (msg_id, kind)
        self.counters["opens" if kind == "open" else "reopens"] += 1
        self._control.append(encode(Message(id=msg_id, type=kind, from_=sender, to=SESSION, body=body or None)))

    def _session_event(self, msg: Message, actions: list[Action]) -> None:
        if msg.type == "response":
            pending = self._pending
            if pending is not None and _same_id(msg.id, pending[0]):
                self._pending = None
                self._answered(pending[1], msg, actions)
            return  # the answer to 'close' or 'drained', or a stale one: nothing to do
        body = msg.body or {}
        if msg.type == "update" and body.get("value") == "draining":
            self._draining(actions)
        elif msg.type == "update" and type(body.get("ack")) is int and self.ack_granted:
            self._released(body["ack"], actions)

    def _answered(self, kind: str, msg: Message, actions: list[Action]) -> None:
        code = response_code(msg)
        body = msg.body or {}
        if code == 200:
            fresh = False
            if kind == "open":
                token = body.get("runtimeToken")
                if not isinstance(token, str) or not token:
                    self._why = f"{SESSION} granted the session without a runtimeToken"
                    actions.append(CloseSocket(CloseCode.PROTOCOL_ERROR, "no runtimeToken"))
                    return
                fresh = self._had_session
                self.session_url = f"{self.runtime_url}/{token}"
                self._had_session = True
                self.delivered = 0  # a new session: the node numbers from 1 again
            self.phase = LIVE
            self.backoff.reset()
            self._established = True
            self.batch_granted = body.get("batch") is True
            self.drain_granted = body.get("drain") is True
            self.ack_granted = body.get("ack") is True
            received = body.get("received")
            self._resync(received if self.ack_granted and type(received) is int and received > 0 else 0, actions)
            if kind == "open" and self.settings.ack:
                actions.append(self.saved_state())
            limit = body.get("maxFrame")
            if self.batch_granted and type(limit) is int and limit > 2:
                self.frame_limit = min(self.settings.batch_bytes, limit)
            if fresh:
                self._resubscribe()
            description = "new session: the node did not know the previous one" if fresh else None
            actions.append(Status("live", description))
            actions.append(Live(fresh))
            if self.outbox:
                actions.append(Wake())
            return
        reason = body.get("description") or body.get("desc") or f"code {code}"
        if kind == "re-open":
            # The node lost the session (restart, expiry): reTHINK's stubs stop here; we open a new one.
            self.counters["reopen_fallbacks"] += 1
            self.session_url = None
            self._send_open("open", self.runtime_url)
            actions.append(Wake())
            return
        if code in _PERMANENT:
            self.phase = STOPPED
            description = f"the message node refused the session: {code} {reason}"
            actions.append(Status("failed", description))
            actions.append(Failed(description))
            actions.append(CloseSocket(CloseCode.NORMAL_CLOSURE, "session refused"))
            actions.extend(self._refuse_outbox(description))
            return
        self._why = f"the message node refused the session: {code} {reason}"
        actions.append(CloseSocket(CloseCode.NORMAL_CLOSURE, "session refused"))

    def _draining(self, actions: list[Action]) -> None:
        """Graceful stop of the node: nothing after 'drained', which is our last frame on this socket."""
        if self.phase != LIVE or self.session_url is None:
            return
        self.phase = DRAINING
        self.counters["drains"] += 1
        self._control.append(self._session_message("update", self.session_url, {"value": "drained"}))
        actions.append(Wake())

    def _decode(self, data: bytes) -> list[Message]:
        """The messages of one frame (``protofly.message.decode_frame``); bad ones are counted, not fatal."""
        try:
            items = decode_frame(data, max_size=len(data), keep_raw=False)
        except MessageError:
            self.counters["invalid"] += 1
            return []
        messages: list[Message] = []
        for item, _, _ in items:
            if isinstance(item, MessageError):
                self.counters["invalid"] += 1
            else:
                messages.append(item)
        return messages

    def _refuse(self, msg: Message, code: int, description: str) -> Answer | None:
        self.counters["refused"] += 1
        if msg.type == "response":
            return None  # an answer cannot be answered; counted
        return Answer(response(msg, code, description))

    def _refuse_outbox(self, description: str) -> list[Action]:
        actions: list[Action] = []
        self.outbox.extendleft(reversed(self.inflight))  # never acknowledged: answered with the rest
        self.inflight.clear()
        self._marks.clear()
        while self.outbox:
            data = self.outbox.popleft()
            try:
                msg = decode(data, max_size=len(data) + 1)
            except MessageError:
                continue
            answer = self._refuse(msg, 503, description)
            if answer is not None:
                actions.append(answer)
        self.outbox_size = 0
        if self.settings.ack:
            actions.append(self.saved_state())
        return actions

    def _state_words(self) -> str:
        return {IDLE: "unreachable", OPENING: "being connected", DRAINING: "draining"}.get(self.phase, self.phase)


def _same_id(got: int | str | None, sent: int) -> bool:
    """Vert.x re-encodes ids as integers; other peers may turn them into strings."""
    return got == sent or got == str(sent)


# -- the asyncio shell -------------------------------------------------------------------------------


class _Connection(ClientConnection):
    """A client connection that hands what its protocol queued to the transport in one write.

    websockets writes each frame with its own ``transport.write`` (a system call each when the socket
    buffer is empty); the writer queues an ack and the frame it rides with together, and this makes them
    one segment, so the node is woken once for both.  A half-close among them falls back to websockets.
    """

    def send_data(self) -> None:
        chunks = self.protocol.data_to_send()
        if chunks and all(chunks):
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            return
        self.protocol.writes[:0] = chunks
        super().send_data()


class MsgNodeStub(ProtoStub):
    """The runtime's end of a message node session: reconnects by itself, loses nothing it accepted.

    Status: ``created`` → ``in-progress`` → ``live``; a lost socket gives ``disconnected`` (the close code
    in words), then ``in-progress`` → ``live`` again after a ``re-open`` (or a fresh ``open`` when the node
    forgot the session); ``disconnect()`` gives ``disconnected`` with ``1000 (normal closure)``; a node that
    refuses the session for good (``401``/``403``/``400``) gives ``failed``.
    """

    def __init__(self, url: str, bus: Bus, config: Mapping[str, Any] | None = None) -> None:
        settings = Settings.load(config or {})
        super().__init__(url, bus, config)
        self.settings = settings
        saved = self.saved_state if isinstance(self.saved_state, Mapping) else None
        self.session = NodeSession(settings, url, saved=saved)
        self._loop_task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._wake: asyncio.Event | None = None
        self._open_timer: asyncio.TimerHandle | None = None
        #: The delayed-ack timer (``AckLater``) of the current socket; cancelled when it goes.
        self._ack_timer: asyncio.TimerHandle | None = None
        self._first: asyncio.Future[None] | None = None
        self._saving: asyncio.Handle | None = None
        #: Connection attempts that failed or ended: picks the node (``_node_url``).
        self._attempt = 0

    # -- the SDK's hooks ------------------------------------------------------------------------

    async def connect(self, credentials: Mapping[str, Any] | None = None) -> None:
        """Open the session, once: raise if the first attempt fails; after that, reconnect by itself."""
        self.session.set_credentials(credentials)
        if self._running():
            return  # the connection loop is at work (a reconnect); the outbox holds messages meanwhile
        tune_gc()
        self.session.start()
        loop = asyncio.get_running_loop()
        first = self._first = loop.create_future()
        self._loop_task = self.bus.spawn(self._run(), quiet=True)
        bound = 2 * self.settings.open_timeout + 1.0
        try:
            await asyncio.wait_for(asyncio.shield(first), bound)
        except TimeoutError:
            await self._stop_loop()
            raise ConnectionError(f"no session with {self.settings.url} within {bound:g} s") from None
        except ConnectionError:
            await self._stop_loop()
            raise

    async def disconnect(self) -> None:
        """Send what is queued, then ``close``; wait (bounded) for the node to close the socket."""
        self._apply(self.session.disconnect())
        task = self._loop_task
        if task is None or task.done():
            self.status("disconnected", "disconnected on request")
            return
        if self.session.phase == CLOSING:
            done, _ = await asyncio.wait([task], timeout=self.settings.open_timeout)
            if done:
                return  # the loop published "disconnected" with the close code
        await self._stop_loop()
        self._apply(self.session.disconnect())  # whatever phase the loop left: stopped, outbox answered
        self.status("disconnected", "disconnected on request")

    def on_message(self, msg: Message) -> None:
        answer = self.session.submit(msg)
        if answer is not None:
            self.deliver(answer.message)
            return
        if self.session.phase == LIVE:
            wake = self._wake
            if wake is not None:
                wake.set()

    def needs_connect(self) -> bool:
        # The SDK auto-connects a stub that is not live; this one reconnects by itself (its outbox holds
        # messages meanwhile), so only a stub whose loop is not running needs the SDK's help.
        return not self._running() and super().needs_connect()

    # -- the connection loop --------------------------------------------------------------------

    def _running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def _run(self) -> None:
        """Connect, serve the socket until it goes, wait the backoff, again; until stopped or refused."""
        while True:
            delay = await self._one_connection()
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _node_url(self) -> str:
        """The node to try now: ``url``, then (after each lost or failed connection) the next of ``urls``."""
        nodes = (self.settings.url, *self.settings.urls)
        return nodes[self._attempt % len(nodes)]

    async def _one_connection(self) -> float | None:
        settings = self.settings
        delay = await self._serve_node(settings)
        if delay is not None:
            self._attempt += 1  # a cluster's next node: the one just tried failed or went away
        return delay

    async def _serve_node(self, settings: Settings) -> float | None:
        try:
            # The stub has no network of its own: the runtime opens the connection its descriptor declares.
            url = self._node_url()
            sock = await asyncio.wait_for(self.open_connection(url), settings.open_timeout)
        except (OSError, TimeoutError) as exc:
            return self._apply(self.session.connect_failed(summary(exc)))
        try:
            ws = await ws_connect(
                url,
                sock=sock,
                compression=None,
                proxy=None,
                open_timeout=settings.open_timeout,
                ping_interval=settings.ping_interval or None,
                ping_timeout=settings.ping_interval or None,
                close_timeout=settings.open_timeout,
                max_size=None,
                max_queue=(4096, 1024),
                write_limit=(1 << 20, 256 << 10),
                user_agent_header=None,
                create_connection=_Connection,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            sock.close()
            return self._apply(self.session.connect_failed(summary(exc)))
        self._ws = ws
        wake = self._wake = asyncio.Event()
        writer = self.bus.spawn(self._write(ws, wake), quiet=True)
        code: int | None = None
        reason: str | None = None
        try:
            self._apply(self.session.socket_opened())
            self._open_timer = asyncio.get_running_loop().call_later(settings.open_timeout, self._open_timeout)
            code, reason = await self._read(ws)
        finally:
            self._cancel_open_timer()
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
            self._ws = None
            self._wake = None
            writer.cancel()
            if ws.state is not State.CLOSED:
                ws.transport.abort()  # cancelled (disconnect, shutdown): no socket outlives the loop
            await asyncio.wait([writer], timeout=1.0)
        return self._apply(self.session.closed(code, reason))

    async def _read(self, ws: ClientConnection) -> tuple[int | None, str | None]:
        received = self.session.received
        apply = self._apply
        try:
            while True:
                data = await ws.recv(decode=False)
                apply(received(data))
        except ConnectionClosed as exc:
            close = exc.rcvd
            return (close.code, close.reason) if close is not None else (None, None)

    async def _write(self, ws: ClientConnection, wake: asyncio.Event) -> None:
        """Write every frame the session has, in order; put back what never reached the socket.

        Frames ready together (an ack and the frame it rides with) go in one ``send_context``, which
        ``_Connection`` writes in one system call, so the node wakes once for them.  The frames are written
        synchronously while the connection is open and only then may the writer wait (flow control) or
        fail, so a frame is unsent exactly when the connection was no longer open before the call.
        """
        session = self.session
        protocol = ws.protocol
        while True:
            await wake.wait()
            wake.clear()
            while (item := session.next_frame()) is not None:
                group = [item]
                size = len(item[0])
                while size < _GROUP_BYTES and (item := session.next_frame()) is not None:
                    group.append(item)
                    size += len(item[0])
                if ws.state is not State.OPEN:
                    for frame, count in group:
                        session.unsent(frame, count)
                    return
                try:
                    async with ws.send_context():
                        for frame, _ in group:
                            protocol.send_text(frame)
                finally:
                    for _, count in group:
                        if count:
                            session.written(count)

    def _open_timeout(self) -> None:
        self._open_timer = None
        self._apply(self.session.open_timed_out())

    def _ack_expired(self) -> None:
        self._ack_timer = None
        self._apply(self.session.ack_timer())

    def _cancel_open_timer(self) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None

    def _apply(self, actions: list[Action]) -> float | None:
        """Carry out the session's actions; returns the retry delay if there is one."""
        delay = None
        if self._saving is None:
            for action in actions:
                if type(action) is SaveState:  # before the deliveries post (and the host schedules its flush)
                    self._save_soon()
                    break
        for action in actions:
            match action:
                case Deliver(messages=messages):
                    deliver = self.deliver
                    for msg in messages:
                        deliver(msg)
                case Wake():
                    if self._wake is not None:
                        self._wake.set()
                case AckLater(delay=wait):
                    if self._ack_timer is None and self._ws is not None:
                        self._ack_timer = asyncio.get_running_loop().call_later(wait, self._ack_expired)
                case Status(value=value, description=description):
                    if value != self.state or value != "in-progress":
                        self.status(value, description)
                case Answer(message=message):
                    self.deliver(message)
                case Live():
                    self._cancel_open_timer()
                    self._settle_first(None)
                case Retry(delay=retry):
                    delay = retry
                case CloseSocket(code=code, reason=reason):
                    self._close_socket(code, reason)
                case Failed(description=description):
                    self._settle_first(ConnectionError(description))
                case SaveState():
                    pass  # scheduled above
        return delay

    def _save_soon(self) -> None:
        """Hand the runtime the session's latest state once per loop iteration, however many frames came.

        Posted after this iteration's deliveries (the host sends them in order), so the runtime never
        holds a ``received`` ahead of the messages it has, nor a ``handedOver`` ahead of the node's acks.
        Scheduled before those deliveries are posted (``_apply``): the host writes what is posted once per
        iteration, from a callback it schedules at the first post, so the save runs first and travels in the
        same frame as the deliveries -- one write, and one wake-up of the runtime, instead of two.
        """
        if self._saving is None:
            self._saving = asyncio.get_running_loop().call_soon(self._save_now)

    def _save_now(self) -> None:
        self._saving = None
        save = self.session.saved_state()
        self.save_state(save.state, handed_over=save.handed_over)

    def _settle_first(self, error: BaseException | None) -> bool:
        """Resolve ``connect()``'s wait; True if it was still waiting (so this was the first attempt)."""
        first = self._first
        if first is None or first.done():
            return False
        if error is None:
            first.set_result(None)
        else:
            first.set_exception(error)
        return True

    def _close_socket(self, code: int, reason: str) -> None:
        ws = self._ws
        if ws is not None:
            self.bus.spawn(ws.close(code, reason), quiet=True)

    async def _stop_loop(self) -> None:
        task = self._loop_task
        self._loop_task = None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=2.0)
