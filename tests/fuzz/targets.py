"""Every decoder protofly exposes to the outside, as one fuzz target each: input in, documented error only.

A target takes ``bytes`` or ``str`` (the two forms input arrives in) and returns normally when the decoder
either accepted the input or refused it with its documented error type; any other exception escapes and
is the finding.  Accepted input is checked further where the decoder promises something about it (a
decoded message can be encoded again and decodes to itself; the node answers with actions, never raises).

The same targets run under Hypothesis in the suite (``tests/fuzz/test_fuzz_*.py``, bounded) and under
atheris for long runs (``make fuzz``, ``fuzz/*.py``).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protofly import message
from protofly.admin.protocol import AdminError
from protofly.admin.server import send_body
from protofly.catalogue.errors import CatalogueError
from protofly.catalogue.httpserve import HeadError, body_length, parse_head
from protofly.catalogue.model import parse_descriptor, parse_source_package
from protofly.config import ConfigError, RuntimeConfig
from protofly.message import Message, MessageError
from protofly.msgnode.actions import Close, Send
from protofly.msgnode.core import SESSION_URL, MessageNodeCore
from protofly.sandbox.channel import FrameDecoder, FrameError

Data = bytes | str
MAX = 64 << 10  # a small size limit, so oversized input is reachable by the fuzzers too


def _check_round_trip(msg: Message) -> None:
    """What the decoder accepted can be written and read back unchanged (so it can be forwarded)."""
    again = message.decode(message.encode(msg), max_size=1 << 30)
    assert again == msg, (again, msg)
    assert again.type == again.type.lower() and again.type


def message_decode(data: Data) -> None:
    try:
        msg = message.decode(data, max_size=MAX)
    except MessageError:
        return
    _check_round_trip(msg)


def message_decode_batch(data: Data) -> None:
    try:
        batch = message.decode_batch(data, max_size=MAX)
    except MessageError:
        return
    for msg in batch:
        _check_round_trip(msg)


def message_decode_frame(data: Data) -> None:
    for keep_raw in (True, False):
        try:
            items = message.decode_frame(data, max_size=MAX, keep_raw=keep_raw)
        except MessageError:
            return
        for item in items:
            assert isinstance(item.message, Message | MessageError)
            if isinstance(item.message, Message):
                _check_round_trip(item.message)


def message_from_dict(value: Any) -> None:
    """Python data (what a stub posts): validated by the decoder's rules, or refused with MessageError."""
    try:
        msg = message.from_dict(value)
    except MessageError:
        return
    _check_round_trip(msg)


class _Conn:
    """A connection key for the node core."""

    def __init__(self, name: str) -> None:
        self.name = name


_ids = itertools.count()


def _node() -> tuple[MessageNodeCore, _Conn, _Conn]:
    """A core with one plain and one batching connection, both with an open session."""
    core = MessageNodeCore("b.test", max_frame=MAX, new_id=lambda: f"id{next(_ids)}")
    plain, batch = _Conn("plain"), _Conn("batch")
    for conn, asked in ((plain, False), (batch, True)):
        core.connected(conn)
        opening = Message(
            id=1, type="open", from_=f"hyperty-runtime://{conn.name}.test/rt", to=SESSION_URL, body={"batch": asked}
        )
        core.received(conn, message.encode(opening))
    return core, plain, batch


def node_frames(data: Data) -> None:
    """Any text or binary frame on a plain or batching session: actions out, never an exception."""
    core, plain, batch = _node()
    for conn in (plain, batch):
        actions = core.received(conn, data)
        for action in actions:
            if isinstance(action, Send):
                # whatever the node writes is a frame its peers can read
                message.decode_frame(bytes(action.data), max_size=1 << 30)
            elif isinstance(action, Close):
                assert 1000 <= action.code < 5000 and len(action.reason.encode()) <= 123
    fresh = _Conn("fresh")
    core.connected(fresh)
    assert [type(action) for action in core.received_binary(fresh)] == [Close]


def channel_frames(data: Data) -> None:
    """A sandbox channel byte stream, fed whole and byte by byte: the same events, messages or FrameError."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    whole = FrameDecoder(max_frame=MAX).feed(raw)
    split = FrameDecoder(max_frame=MAX)
    pieces: list[Message | FrameError] = []
    for index in range(0, len(raw), 7):
        pieces += split.feed(raw[index : index + 7])
    assert all(isinstance(event, Message | FrameError) for event in whole)
    assert whole == pieces


def descriptor(data: Data) -> None:
    try:
        parsed = parse_descriptor(data, max_size=MAX)
    except CatalogueError:
        pass
    else:
        parsed.summary()
    try:
        parse_source_package(data, max_size=MAX)
    except CatalogueError:
        pass


def descriptor_value(value: Any) -> None:
    """An already-decoded descriptor (what the catalogue client holds after its own JSON decode)."""
    try:
        parse_descriptor(value).summary()
    except CatalogueError:
        pass


def http_head(data: Data) -> None:
    """A catalogue server request head: parsed, or a HeadError with a status the server can answer."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    try:
        head = parse_head(raw, max_line_size=256, max_field_size=256, max_headers=8)
        body_length(head)
    except HeadError as exc:
        assert exc.status in (400, 414, 431, 505), exc.status
        return
    assert head.method and head.version[0] == 1 and len(head.headers) <= 8


def admin_send(data: Data) -> None:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    try:
        msg = send_body(raw, "hyperty-runtime://a.test/rt/cli", MAX)
    except AdminError as exc:
        assert exc.status == 400 and exc.field
        return
    _check_round_trip(msg)


def config_file(data: Data) -> None:
    """A configuration file's bytes, then the same text as the environment's ``PROTOFLY_CATALOGUES``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "protofly.toml"
        path.write_bytes(raw)
        try:
            RuntimeConfig.load(path, environ={}, domain="a.test")
        except ConfigError:
            pass
    text = raw.decode("utf-8", "replace")
    for name in ("PROTOFLY_CATALOGUES", "PROTOFLY_DEPLOY_TIMEOUT", "PROTOFLY_SANDBOX_PRELOAD"):
        try:
            RuntimeConfig.load(environ={name: text, "PROTOFLY_DOMAIN": "a.test"})
        except ConfigError:
            pass


def config_mapping(value: Any) -> None:
    try:
        RuntimeConfig.from_mapping(value if isinstance(value, dict) else {"domain": value})
    except ConfigError:
        pass


#: The byte/text targets (atheris runs these by name: ``make fuzz TARGET=node_frames``).
TARGETS: dict[str, Callable[[Data], None]] = {
    "message": message_decode,
    "message_batch": message_decode_batch,
    "message_frame": message_decode_frame,
    "node_frames": node_frames,
    "channel": channel_frames,
    "descriptor": descriptor,
    "admin_send": admin_send,
    "http_head": http_head,
    "config": config_file,
}
