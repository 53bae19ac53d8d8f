"""Framing of the sandbox channel, sans-I/O: bytes in → messages out, messages in → bytes out.

The runtime and a sandbox host talk over a socketpair (never stdout, which a stub's ``print`` would
corrupt).  Each frame is a 4-byte big-endian length followed by JSON: either one reTHINK message or a JSON
array of messages, so that everything posted in one event-loop iteration travels as one frame and one
system call.  The same classes run on both sides; neither touches a socket, so every edge case (split
headers, oversized frames, a bad message inside a good batch) is tested without I/O.

An oversized frame is skipped without being buffered (its bytes are discarded as they arrive), so a
hostile peer cannot make the reader allocate what the header announces.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from protofly.message import Message, MessageError, decode_frame, encode

__all__ = [
    "DEFAULT_MAX_FRAME",
    "LIVENESS",
    "SANDBOX_EXTERNAL",
    "SANDBOX_INTERNAL",
    "FrameDecoder",
    "FrameEncoder",
    "FrameError",
    "control",
]

#: The runtime side of the control protocol (reTHINK's ``hyperty-runtime://sandbox/external``).
SANDBOX_EXTERNAL = "hyperty-runtime://sandbox/external"
#: The host side of the control protocol (reTHINK's ``hyperty-runtime://sandbox/internal``).
SANDBOX_INTERNAL = "hyperty-runtime://sandbox/internal"

#: The resource of the runtime's liveness ping: ``read {resource: "liveness"}`` to the host, answered from
#: the stub's event loop (:mod:`protofly.liveness`).
LIVENESS = "liveness"

#: Largest frame payload accepted or produced unless configured otherwise (1 MiB, as for one message).
DEFAULT_MAX_FRAME = 1 << 20

_HEADER = struct.Struct(">I")
_HEADER_SIZE = _HEADER.size


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame (or one message of a batch) that was dropped; ``kind`` is ``oversized`` or ``invalid``.

    It is an event, not an exception: the reader counts and logs it and carries on with the next frame.
    ``description`` names the problem but never quotes the content, which may hold credentials.
    """

    kind: str
    size: int
    description: str


class FrameDecoder:
    """Turns a byte stream into messages and :class:`FrameError` events, in order."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 2:
            raise ValueError(f"max_frame must be at least 2 bytes, got {max_frame}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._skip = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (a test and a leak detector use it)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message | FrameError]:
        """Consume ``data`` and return every message and error completed by it."""
        events: list[Message | FrameError] = []
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            view = view[taken:]
        buffer = self._buffer
        buffer += view
        end = len(buffer)
        pos = 0
        while end - pos >= _HEADER_SIZE:
            (length,) = _HEADER.unpack_from(buffer, pos)
            start = pos + _HEADER_SIZE
            if length > self.max_frame:
                events.append(
                    FrameError("oversized", length, f"frame of {length} bytes is over the {self.max_frame}-byte limit")
                )
                available = end - start
                if available >= length:
                    pos = start + length
                    continue
                self._skip = length - available
                pos = end
                break
            if end - start < length:
                break
            with memoryview(buffer) as whole:
                self._decode_frame(whole[start : start + length], events)
            pos = start + length
        if pos:
            del buffer[:pos]
        return events

    def _decode_frame(self, frame: memoryview, events: list[Message | FrameError]) -> None:
        """One frame: a message or a batch; a bad message in a batch costs only itself."""
        try:
            items = decode_frame(frame, max_size=self.max_frame, keep_raw=False)
        except MessageError as exc:
            events.append(FrameError("invalid", len(frame), str(exc)))
            return
        for message, raw, position in items:
            if isinstance(message, MessageError):
                text = str(message) if position is None else f"batch item {position}: {message}"
                events.append(FrameError("invalid", len(raw), text))
            else:
                events.append(message)


class FrameEncoder:
    """Collects encoded messages and cuts them into as few frames as the size limit allows.

    Messages are encoded when added, so a message that can never fit is refused at once, at the call
    that produced it (``MessageError``), instead of vanishing later in a flush.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 2:
            raise ValueError(f"max_frame must be at least 2 bytes, got {max_frame}")
        self.max_frame = max_frame
        self._parts: list[bytes] = []
        #: Bytes queued and not yet flushed: with the transport's buffer, what the stub has not read yet.
        self.pending_bytes = 0

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, msg: Message) -> None:
        """Queue ``msg`` for the next :meth:`flush`; raises :class:`MessageError` if it is too large."""
        data = encode(msg)
        if len(data) > self.max_frame:
            raise MessageError(f"size: message of {len(data)} bytes is over the {self.max_frame}-byte frame limit")
        self._parts.append(data)
        self.pending_bytes += len(data)

    def flush(self) -> bytes:
        """All queued messages as frames (empty bytes if nothing is queued)."""
        parts = self._parts
        if not parts:
            return b""
        self._parts = []
        self.pending_bytes = 0
        if len(parts) == 1:
            return _HEADER.pack(len(parts[0])) + parts[0]
        total = sum(len(p) for p in parts) + len(parts) + 1
        if total <= self.max_frame:
            return _frame_batch(parts)
        return b"".join(_frame_batch(group) for group in self._groups(parts))

    def _groups(self, parts: list[bytes]) -> list[list[bytes]]:
        groups: list[list[bytes]] = []
        current: list[bytes] = []
        size = 1  # the opening bracket; each part adds itself plus a comma or the closing bracket
        for part in parts:
            if current and size + len(part) + 1 > self.max_frame:
                groups.append(current)
                current, size = [], 1
            current.append(part)
            size += len(part) + 1
        groups.append(current)
        return groups


def _frame_batch(parts: list[bytes]) -> bytes:
    if len(parts) == 1:
        return _HEADER.pack(len(parts[0])) + parts[0]
    payload = b"[" + b",".join(parts) + b"]"
    return _HEADER.pack(len(payload)) + payload


def control(
    msg_type: str,
    body: dict[str, Any],
    *,
    msg_id: int | None = None,
    to: str = SANDBOX_INTERNAL,
    sender: str = SANDBOX_EXTERNAL,
) -> Message:
    """A control message of the sandbox protocol (``create``/``execute``/``delete`` and host notices)."""
    return Message(id=msg_id, type=msg_type, from_=sender, to=to, body=body)
