"""Every way input enters, fed the bad input of issue 14: one documented error type, naming the field."""

from __future__ import annotations

import pytest

from protofly.catalogue.errors import CatalogueError, DescriptorError
from protofly.catalogue.model import parse_descriptor
from protofly.config import ConfigError, RuntimeConfig
from protofly.message import MessageError, decode, decode_batch, decode_frame, from_dict, loads
from protofly.sandbox.channel import FrameDecoder, FrameError

SURROGATE = '{"type":"create","from":"a\ud800","to":"c:d"}'
DEEP = b'{"type":"read","from":"a:b","to":"c:d","body":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (SURROGATE, "json: text holds a lone surrogate at character 26"),
        (b'{"type":"create","from":"a\xff","to":"c:d"}', "json: not a valid JSON message (invalid UTF-8 (byte 0xff"),
        (DEEP, "json: not a valid JSON message (nested too deeply)"),
        (b'{"type":"read","from":"a:b","to":"c:d","id":' + b"9" * 5000 + b"}", "id: Integer value out of range"),
        (b'{"type":"read","from":"a:b","to":"c:d","body":{"x":1e999}}', "body"),
        (b'{"type":["read"],"from":"a:b","to":"c:d"}', "type: Expected `str`"),
        (b'{"type":"re ad","from":"a:b","to":"c:d"}', "type: 're ad' is not a message type"),
    ],
)
def test_message_decode_raises_only_message_error_naming_the_field(data, words):
    for decoder in (decode, lambda d: decode_frame(d)[0].message):
        try:
            result = decoder(data)
        except MessageError as exc:
            result = exc
        assert isinstance(result, MessageError) and str(result).startswith(words), result


def test_a_batch_that_is_not_an_array_names_the_batch():
    with pytest.raises(MessageError, match="^batch: Expected `array`"):
        decode_batch(b'{"type":"read","from":"a:b","to":"c:d"}')
    with pytest.raises(MessageError, match="^json: text holds a lone surrogate"):
        decode_batch(f"[{SURROGATE}]")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"type": "read", "from": "a\udc80", "to": "c:d"}, "message: cannot be written as JSON (lone surrogate"),
        ({"type": "read", "from": "a:b", "to": "c:d", "body": {"s": {1, 2}}}, "body"),  # a set is JSON's array
        ({"type": "read", "from": "a:b", "to": "c:d", "body": {"x": object()}}, "message: cannot be written"),
        ({"type": "read", "from": "a:b", "to": "c:d", "id": 10**5000}, "message: cannot be written"),
        (["not", "a", "message"], "message: Expected `object`"),
    ],
)
def test_from_dict_accepts_only_what_can_be_sent(value, words):
    try:
        msg = from_dict(value)
    except MessageError as exc:
        assert str(exc).startswith(words), exc
    else:
        assert words == "body" and msg.body == {"s": [1, 2]}


def test_from_dict_refuses_a_cycle():
    body: dict = {}
    body["self"] = body
    with pytest.raises(MessageError, match="cannot be written as JSON"):
        from_dict({"type": "read", "from": "a:b", "to": "c:d", "body": body})


@pytest.mark.parametrize("data", [b'{"n":NaN}', b'{"n":Infinity}', b"[" * 5000, b'"\xff"', '"\udfff"'])
def test_loads_refuses_what_python_json_would_accept_or_crash_on(data):
    with pytest.raises(MessageError, match="^body: "):
        loads(data)


def test_the_sandbox_channel_turns_bad_frames_into_events_and_reads_on():
    good = b'{"type":"read","from":"a:b","to":"c:d"}'
    frames = [b'{"type":"read","from":"a\xff","to":"c:d"}', DEEP, b"[" + good + b",1]", good]
    stream = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    events = FrameDecoder(max_frame=1 << 20).feed(stream)
    kinds = [e.kind if isinstance(e, FrameError) else e.type for e in events]
    assert kinds == ["invalid", "invalid", "read", "invalid", "read"]
    assert "UTF-8" in events[0].description and "batch item 1" in events[3].description


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ('{"objectName":"x\ud800"}', "lone surrogate"),
        (b'{"objectName":"\xff"}', "not valid UTF-8"),
        (b'{"objectName":' + b"[" * 100_000, "not valid JSON"),
        (b'{"objectName":"x","language":"python","version":' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"objectName":"x","language":"python","sandbox":{"memoryMB":"lots"}}', "sandbox.memoryMB"),
    ],
)
def test_descriptor_text_raises_only_descriptor_error(data, words):
    with pytest.raises(DescriptorError, match=words):
        parse_descriptor(data)


@pytest.mark.parametrize("field", ["version", "cguid"])
def test_a_decoded_descriptor_with_a_huge_number_is_a_descriptor_error(field):
    with pytest.raises(CatalogueError, match=f"{field}: a number of more than 64 digits"):
        parse_descriptor({"objectName": "x", "language": "python", field: 10**5000})


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'domain = "a.test"\nmemory_mb = 1\xff\n', "not UTF-8"),
        (b"memory_mb = " + b"9" * 5000 + b"\n", "not valid TOML"),
        (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML"),
        (b'state_dir = ["a"]\n', "state_dir: expected a path"),
    ],
)
def test_config_files_raise_only_config_error(tmp_path, content, words):
    path = tmp_path / "protofly.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        RuntimeConfig.load(path, environ={}, domain="a.test")


@pytest.mark.parametrize("raw", ["[" * 5000, '{"b.test": ' + "9" * 5000 + "}"])
def test_config_environment_json_raises_only_config_error(raw):
    with pytest.raises(ConfigError, match="PROTOFLY_CATALOGUES"):
        RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_CATALOGUES": raw})
