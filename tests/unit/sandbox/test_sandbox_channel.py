"""The sans-I/O framing of the sandbox channel: bytes in → messages out, messages in → bytes out."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protofly.message import Message, MessageError, as_dict
from protofly.sandbox.channel import FrameDecoder, FrameEncoder, FrameError, control


def msg(n: int, pad: int = 0) -> Message:
    return Message(
        id=n, type="create", from_="hyperty://b.test/x", to="hyperty://a.test/y", body={"n": n, "pad": "p" * pad}
    )


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_one_message_is_one_object_frame():
    data = FrameEncoder().flush() + _encoded([msg(1)])
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert json.loads(data[4:])["id"] == 1


def test_messages_queued_together_travel_as_one_array_frame():
    data = _encoded([msg(1), msg(2), msg(3)])
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert [m["id"] for m in json.loads(data[4:])] == [1, 2, 3]
    assert [m.id for m in FrameDecoder().feed(data)] == [1, 2, 3]


def test_flush_with_nothing_queued_gives_no_bytes():
    encoder = FrameEncoder()
    assert encoder.flush() == b""
    encoder.add(msg(1))
    assert len(encoder) == 1
    encoder.flush()
    assert encoder.flush() == b""


def test_a_batch_over_the_limit_is_cut_into_several_frames_that_each_fit():
    encoder = FrameEncoder(max_frame=300)
    for n in range(10):
        encoder.add(msg(n, pad=60))
    data = encoder.flush()
    sizes = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        sizes.append(length)
        pos += 4 + length
    assert len(sizes) > 1
    assert max(sizes) <= 300
    assert [m.id for m in FrameDecoder(max_frame=300).feed(data)] == list(range(10))


def test_a_message_that_can_never_fit_is_refused_when_added():
    encoder = FrameEncoder(max_frame=100)
    with pytest.raises(MessageError, match="size: message of .* over the 100-byte frame limit"):
        encoder.add(msg(1, pad=200))
    assert len(encoder) == 0


def test_headers_and_payloads_split_across_reads_are_reassembled():
    data = _encoded([msg(1)]) + _encoded([msg(2), msg(3)])
    decoder = FrameDecoder()
    out = []
    for index in range(len(data)):
        out += decoder.feed(data[index : index + 1])
    assert [m.id for m in out] == [1, 2, 3]
    assert decoder.buffered == 0


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40),
)
def test_any_chunking_of_any_stream_gives_back_the_same_messages(ids, cuts):
    data = b"".join(_encoded([msg(i)]) for i in ids)
    decoder = FrameDecoder()
    out = []
    pos = 0
    for cut in cuts:
        out += decoder.feed(data[pos : pos + cut])
        pos += cut
    out += decoder.feed(data[pos:])
    assert [m.id for m in out] == ids


def test_an_oversized_frame_is_skipped_without_buffering_it_and_the_next_frame_still_arrives():
    decoder = FrameDecoder(max_frame=1000)
    header = struct.pack(">I", 50_000)
    events = decoder.feed(header + b"x" * 100)
    assert events == [FrameError("oversized", 50_000, "frame of 50000 bytes is over the 1000-byte limit")]
    assert decoder.buffered == 0
    for _ in range(49):
        assert decoder.feed(b"x" * 1000) == []
        assert decoder.buffered == 0
    tail = b"x" * 900 + _encoded([msg(7)])
    events = decoder.feed(tail)
    assert [e.id for e in events] == [7]


def test_an_oversized_frame_arriving_whole_is_dropped_in_place():
    decoder = FrameDecoder(max_frame=10)
    events = decoder.feed(frame(b"y" * 20) + _encoded_with_limit([msg(1)], 1000))
    assert isinstance(events[0], FrameError) and events[0].kind == "oversized"


def test_a_frame_that_is_not_json_is_an_invalid_frame_event_and_decoding_goes_on():
    decoder = FrameDecoder()
    events = decoder.feed(frame(b"not json at all") + _encoded([msg(2)]))
    assert isinstance(events[0], FrameError)
    assert events[0].kind == "invalid"
    assert events[0].description.startswith("json:")
    assert events[1].id == 2


def test_an_empty_frame_is_invalid():
    events = FrameDecoder().feed(frame(b"") + frame(b"   "))
    assert [(e.kind, e.description) for e in events] == [("invalid", "empty frame")] * 2


def test_a_message_missing_a_field_names_the_field():
    events = FrameDecoder().feed(frame(b'{"type": "create", "to": "hyperty://a.test/x"}'))
    assert events[0].kind == "invalid"
    assert "from" in events[0].description


def test_one_bad_message_in_a_batch_costs_only_itself():
    good = as_dict(msg(1))
    bad = {"type": "create", "to": "hyperty://a.test/x"}
    events = FrameDecoder().feed(frame(json.dumps([good, bad, good]).encode()))
    assert [type(e).__name__ for e in events] == ["Message", "FrameError", "Message"]
    assert events[1].description.startswith("batch item 1: from")


def test_a_batch_that_is_not_even_a_json_array_is_one_invalid_frame():
    events = FrameDecoder().feed(frame(b"[1, 2"))
    assert len(events) == 1 and events[0].kind == "invalid"


def test_frame_errors_never_quote_the_content():
    secret = "hunter2-secret"
    events = FrameDecoder().feed(frame(f'{{"password": "{secret}"'.encode()))
    assert secret not in events[0].description


def test_control_messages_use_the_sandbox_addresses():
    create = control("create", {"url": "u"}, msg_id=3)
    assert (create.from_, create.to, create.id) == (
        "hyperty-runtime://sandbox/external",
        "hyperty-runtime://sandbox/internal",
        3,
    )


def test_limits_below_two_bytes_are_refused():
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder(max_frame=1)
    with pytest.raises(ValueError, match="max_frame"):
        FrameEncoder(max_frame=0)


def _encoded(messages: list[Message]) -> bytes:
    return _encoded_with_limit(messages, 1 << 20)


def _encoded_with_limit(messages: list[Message], limit: int) -> bytes:
    encoder = FrameEncoder(max_frame=limit)
    for m in messages:
        encoder.add(m)
    return encoder.flush()
