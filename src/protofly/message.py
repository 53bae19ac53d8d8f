"""The reTHINK message: one typed struct, one decoder, one exception.

Everything that crosses a boundary (a sandbox channel, a WebSocket, a file) is decoded here, so the rest of
the runtime can trust a :class:`Message` without re-checking it.  The model is deliberately tolerant where
reTHINK peers disagree (type case, ``id`` as int or string, ``to`` as a one-element list, the Phase-1
top-level ``resource``, ``desc`` vs ``description``) and strict where the runtime depends on a field.

The body is never interpreted here: it is passed through as decoded, so a stub or a hyperty can carry any
payload and the runtime only ever adds ``via``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "DEFAULT_MAX_SIZE",
    "TYPES",
    "Message",
    "MessageError",
    "WireMessage",
    "as_dict",
    "decode",
    "decode_batch",
    "encode",
    "error_description",
    "from_dict",
    "is_provisional",
    "loads",
    "response",
    "response_code",
]

#: Types protofly gives semantics to; ``open``/``re-open``/``close`` belong to the message node session.
#: Any other token is a valid type too (reTHINK's conformance tests send ``ping``/``pong``): the bus, the
#: stubs and the node route such a message untouched, by its ``to`` alone.
TYPES = frozenset(
    {
        "create",
        "read",
        "update",
        "delete",
        "subscribe",
        "unsubscribe",
        "response",
        "forward",
        "execute",
        "open",
        "re-open",
        "close",
    }
)

#: What any other type must look like: an HTTP token (RFC 9110 ``tchar``), 1-64 ASCII characters, compared
#: case-insensitively and emitted in lower case.
_TYPE_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}\Z")

#: Largest encoded message accepted by :func:`decode` unless the caller says otherwise (1 MiB).
DEFAULT_MAX_SIZE = 1 << 20


class MessageError(ValueError):
    """A message that cannot be accepted; the text always names the offending field.

    One exception type for every kind of bad input, so that every loop that reads messages from the
    outside needs exactly one ``except`` clause and can answer the sender instead of crashing.
    """


class Message(msgspec.Struct, kw_only=True, omit_defaults=True, rename={"from_": "from"}, gc=False):
    """A reTHINK message ``{id, type, from, to, body}``, as the runtime uses it: ``to`` is one address.

    ``from`` is a Python keyword, hence ``from_``; on the wire it is ``from``.  After construction ``type``
    is lower case.  The variants reTHINK peers put on the wire (``to`` as a one-element list, the Phase-1
    top-level ``resource`` instead of ``to``) are accepted by :func:`decode` through :class:`WireMessage`,
    so code holding a ``Message`` never has to check the form of ``to`` again.

    Not tracked by the garbage collector (``gc=False``): a message holds strings and a JSON body, which
    cannot refer back to it, and messages are the runtime's most numerous objects.  Tracked, the ones a
    runtime holds for a while (the hand-over ledger, queued requests) were promoted at every collection
    until a full collection of the whole heap ran in the middle of the traffic (35 ms, measured with
    ``bench/e2e.py``).  Code must not put a message inside its own body.
    """

    id: int | str | None = None
    type: str
    from_: str
    to: str
    body: dict[str, Any] | None = None
    #: Kept when a Phase-1 message (the seed's own status example) named its destination here.
    resource: str | None = None

    def __post_init__(self) -> None:
        kind = self.type
        if kind not in TYPES:
            if not _TYPE_TOKEN.match(kind):
                raise MessageError(
                    f"type: {kind[:70]!r} is not a message type (1-64 ASCII letters, digits or !#$%&'*+.^_`|~-)"
                )
            self.type = kind.lower()
        if not self.from_:
            raise MessageError("from: must be a non-empty address")
        if not self.to:
            raise MessageError("to: must be a non-empty address")


class WireMessage(msgspec.Struct, kw_only=True, omit_defaults=True, rename={"from_": "from"}):
    """The tolerant wire form: ``to`` may be a one-element list or missing when ``resource`` names it.

    Decoding tries :class:`Message` first (every message protofly itself writes fits it, so the hot path
    pays for one decode) and falls back to this form only when that fails.
    """

    id: int | str | None = None
    type: str
    from_: str
    to: str | list[str] | None = None
    body: dict[str, Any] | None = None
    resource: str | None = None

    def to_message(self) -> Message:
        """The domain message: ``to`` reduced to one address, or :class:`MessageError` naming the field."""
        to = self.to
        if to is None:
            if not self.resource:
                raise MessageError("to: missing (and no top-level resource to route to)")
            to = self.resource
        elif isinstance(to, list):
            if len(to) != 1 or not isinstance(to[0], str) or not to[0]:
                raise MessageError(f"to: expected one address, got a list of {len(to)}")
            to = to[0]
        return Message(id=self.id, type=self.type, from_=self.from_, to=to, body=self.body, resource=self.resource)


_decoder = msgspec.json.Decoder(Message)
_batch_decoder = msgspec.json.Decoder(list[Message])
_wire_decoder = msgspec.json.Decoder(WireMessage)
_wire_batch_decoder = msgspec.json.Decoder(list[WireMessage])
_encoder = msgspec.json.Encoder()


def decode(data: bytes | bytearray | memoryview | str, *, max_size: int = DEFAULT_MAX_SIZE) -> Message:
    """Parse and validate one JSON message, or raise :class:`MessageError` naming what is wrong.

    Nothing else escapes: invalid UTF-8, a ``str`` holding lone surrogates, nesting deeper than msgspec's
    limit, numbers out of range and wrong types all become a :class:`MessageError`.
    """
    if isinstance(data, str):
        data = _utf8(data)
    if len(data) > max_size:
        raise MessageError(f"size: message of {len(data)} bytes is over the {max_size}-byte limit")
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError:
        pass  # perhaps one of reTHINK's variants: the tolerant form says so, or names the field
    except _JSON_ERRORS as exc:
        raise _json_error(exc, "message") from None
    try:
        return _wire_decoder.decode(data).to_message()
    except msgspec.ValidationError as exc:
        raise MessageError(_validation_text(exc)) from None
    except _JSON_ERRORS as exc:
        # the strict pass stopped at a field before it reached the malformed JSON; the tolerant one did not
        raise _json_error(exc, "message") from None


def decode_batch(data: bytes | bytearray | memoryview | str, *, max_size: int = DEFAULT_MAX_SIZE) -> list[Message]:
    """Parse a JSON array of messages in one call (the batched framing of channels that allow it)."""
    if isinstance(data, str):
        data = _utf8(data)
    if len(data) > max_size:
        raise MessageError(f"size: batch of {len(data)} bytes is over the {max_size}-byte limit")
    try:
        return _batch_decoder.decode(data)
    except msgspec.ValidationError:
        pass
    except _JSON_ERRORS as exc:
        raise _json_error(exc, "message batch") from None
    try:
        return [wire.to_message() for wire in _wire_batch_decoder.decode(data)]
    except msgspec.ValidationError as exc:
        raise MessageError(_validation_text(exc, "batch")) from None
    except _JSON_ERRORS as exc:
        raise _json_error(exc, "message batch") from None


def from_dict(obj: Any, *, max_size: int | None = None) -> Message:
    """Validate Python data (for callers that hold a dict, not bytes) by the very rules of :func:`decode`.

    The data goes through JSON once, so whatever is accepted here can also be sent: a lone surrogate, an
    integer id out of range, a value JSON cannot hold or a cycle is a :class:`MessageError` now, not an
    encoding failure later on some other task.
    """
    try:
        data = _encoder.encode(obj)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise MessageError(f"message: cannot be written as JSON ({_reason(exc)})") from None
    return decode(data, max_size=len(data) if max_size is None else max_size)


def loads(data: bytes | bytearray | memoryview | str, *, what: str = "body", max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Plain JSON → Python data under the same rules as :func:`decode` (for bodies that are not yet messages).

    JSON's own edge cases that Python's ``json`` accepts (``NaN``, ``Infinity``) or crashes on (deep nesting
    raises ``RecursionError``) are a :class:`MessageError` naming ``what``.
    """
    if isinstance(data, str):
        data = _utf8(data, what)
    if len(data) > max_size:
        raise MessageError(f"{what}: {len(data)} bytes is over the {max_size}-byte limit")
    try:
        return msgspec.json.decode(data)
    except (*_JSON_ERRORS, msgspec.ValidationError) as exc:
        raise _json_error(exc, "value", what) from None


#: What msgspec raises for bytes that are not JSON (its depth limit included), besides ValidationError.
_JSON_ERRORS = (msgspec.DecodeError, UnicodeError, RecursionError)


def _utf8(text: str, what: str = "json") -> bytes:
    """A ``str`` as UTF-8, or a :class:`MessageError`: only lone surrogates make this fail."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MessageError(f"{what}: text holds a lone surrogate at character {exc.start} (not Unicode)") from None


def _json_error(exc: BaseException, kind: str, what: str = "json") -> MessageError:
    return MessageError(f"{what}: not a valid JSON {kind} ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):  # msgspec's offsets are within the string, not the input
        return f"invalid UTF-8 (byte 0x{exc.object[exc.start]:02x} in a string)"
    if isinstance(exc, UnicodeEncodeError):
        return f"lone surrogate at character {exc.start}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def encode(msg: Message | list[Message]) -> bytes:
    """Serialise to compact JSON, with lower-case ``type`` and ``from`` spelt as on the wire."""
    return _encoder.encode(msg)


def as_dict(msg: Message) -> dict[str, Any]:
    """The wire form as a plain dict (``from`` key, defaults omitted)."""
    wire: dict[str, Any] = msgspec.to_builtins(msg)
    return wire


def response(
    request: Message,
    code: int,
    description: str | None = None,
    *,
    value: Any = None,
    **extra: Any,
) -> Message:
    """Build the answer to ``request``: same ``id``, ``from``/``to`` swapped, ``body.code``.

    The request id is always reused (reTHINK's ``generateMessageResponse`` allocates a new one, which breaks
    correlation); extra keyword arguments become extra body fields (e.g. ``runtimeToken``).
    """
    body: dict[str, Any] = {"code": code}
    if description is not None:
        body["description"] = description
    if value is not None:
        body["value"] = value
    if extra:
        body.update(extra)
    return Message(id=request.id, type="response", from_=request.to, to=request.from_, body=body)


def response_code(msg: Message) -> int | None:
    """``body.code`` as an int, or None when the message carries none (peers sometimes send strings)."""
    body = msg.body
    if not body:
        return None
    code = body.get("code")
    if type(code) is int:
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return None


def is_provisional(msg: Message) -> bool:
    """True for a ``1xx`` response: it is passed on but the request stays open."""
    code = response_code(msg)
    return code is not None and code < 200


def error_description(body: dict[str, Any] | None) -> str | None:
    """The reason in an error or status body; reTHINK peers write either ``description`` or ``desc``."""
    if not body:
        return None
    text = body.get("description")
    if text is None:
        text = body.get("desc")
    return None if text is None else str(text)


def _validation_text(exc: msgspec.ValidationError, whole: str = "message") -> str:
    """Turn msgspec's "... - at `$.from`" into "from: ..." so the field comes first, as everywhere else."""
    text = str(exc)
    detail, sep, where = text.rpartition(" - at `")
    if sep:
        field = where.rstrip("`").removeprefix("$").lstrip(".") or whole
        return f"{field}: {detail}"
    if text.startswith("Object missing required field `"):
        field = text.split("`")[1]
        return f"{field}: missing required field"
    if text.startswith("Expected `"):
        return f"{whole}: {text}"
    return text


# -- frames: one message, or a JSON array of messages --------------------------------------------------

__all__ += ["FrameItem", "decode_frame"]

_raw_items = msgspec.json.Decoder(list[msgspec.Raw])
_JSON_SPACE = b" \t\r\n"


class FrameItem(NamedTuple):
    """One message of a frame: decoded (or why it is not a message), with its exact bytes.

    ``raw`` lets a router forward what it received byte for byte; ``position`` is its index in a JSON-array
    frame, None when the frame is a single message (so a reader can say "batch item 3" where it matters).
    """

    message: Message | MessageError
    raw: bytes | bytearray | memoryview | str | msgspec.Raw
    position: int | None


def decode_frame(
    data: bytes | bytearray | memoryview | str, *, max_size: int = DEFAULT_MAX_SIZE, keep_raw: bool = True
) -> list[FrameItem]:
    """Decode a frame that is one JSON message or a JSON array of messages (the batching framing).

    The one decoder of every batched channel (the message node, its stub, the sandbox channel), so that they
    agree on what a frame is.  A bad message is returned in place as a :class:`MessageError`, so one bad
    element of an array costs only itself; a frame that is not a message or array at all (empty, too large,
    a broken array) raises :class:`MessageError`, and nothing else.

    ``keep_raw=False`` is for readers that do not forward bytes (the sandbox channel, a stub): a well-formed
    array is then decoded in one call, and only a batch with a bad element is taken apart item by item;
    ``raw`` is then the whole frame.
    """
    if isinstance(data, str):
        data = _utf8(data)
    size = len(data)
    if size > max_size:
        raise MessageError(f"size: frame of {size} bytes is over the {max_size}-byte limit")
    start = bytes(data[:64]).lstrip(_JSON_SPACE)
    if not start and size > 64:  # rare: a long run of whitespace
        start = bytes(data).lstrip(_JSON_SPACE)
    if not start:
        raise MessageError("empty frame")
    if start[0] != 0x5B:  # not '[': a single message
        try:
            return [FrameItem(decode(data, max_size=max_size), data, None)]
        except MessageError as exc:
            return [FrameItem(_detached(exc), data, None)]
    if not keep_raw:
        try:
            return [FrameItem(msg, data, index) for index, msg in enumerate(_batch_decoder.decode(data))]
        except (*_JSON_ERRORS, msgspec.ValidationError):
            pass  # a reTHINK variant or a bad element: item by item below says which
    try:
        parts = _raw_items.decode(data)
    except (*_JSON_ERRORS, msgspec.ValidationError) as exc:
        raise MessageError(f"batch: not a JSON array ({_reason(exc)})") from None
    items: list[FrameItem] = []
    for index, part in enumerate(parts):
        try:
            items.append(FrameItem(decode(part, max_size=max_size), part, index))
        except MessageError as exc:
            items.append(FrameItem(_detached(exc), part, index))
    return items


def _detached(exc: MessageError) -> MessageError:
    """The same error without its traceback: a returned error must not keep the caller's frames (and the
    buffer they hold, which a reader may need to resize) alive through a reference cycle."""
    return MessageError(*exc.args)
