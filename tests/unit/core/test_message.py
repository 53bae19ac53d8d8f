"""The message model: tolerant where reTHINK peers disagree, strict where the runtime relies on a field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protofly.message import (
    TYPES,
    Message,
    MessageError,
    as_dict,
    decode,
    decode_batch,
    encode,
    error_description,
    from_dict,
    is_provisional,
    response,
    response_code,
)


def test_round_trip_keeps_body_untouched() -> None:
    body = {"value": {"nested": [1, 2.5, None, "x"]}, "via": "a", "unknownKey": True}
    raw = json.dumps(
        {"id": 7, "type": "create", "from": "hyperty://a.test/1", "to": "hyperty://b.test/2", "body": body}
    )
    msg = decode(raw.encode())
    assert msg.body == body
    again = json.loads(encode(msg))
    assert again == {"id": 7, "type": "create", "from": "hyperty://a.test/1", "to": "hyperty://b.test/2", "body": body}


@pytest.mark.parametrize("given_type", ["UPDATE", "Update", "update"])
def test_type_any_case_in_lower_case_out(given_type: str) -> None:
    msg = decode(json.dumps({"type": given_type, "from": "a:b", "to": "c:d"}))
    assert msg.type == "update"
    assert json.loads(encode(msg))["type"] == "update"


@pytest.mark.parametrize("ident", [1, "1", "abc"])
def test_id_int_or_string_kept_as_given(ident: int | str) -> None:
    msg = decode(json.dumps({"id": ident, "type": "read", "from": "a:b", "to": "c:d"}))
    assert msg.id == ident
    assert json.loads(encode(msg))["id"] == ident


def test_to_as_one_element_list() -> None:
    assert decode(b'{"type":"read","from":"a:b","to":["c:d"]}').to == "c:d"


def test_seed_phase1_message_routes_to_resource() -> None:
    seed = {
        "id": "1",
        "type": "UPDATE",
        "from": "hyperty-runtime://sp1/protostub/123",
        "resource": "hyperty-runtime://sp1/protostub/123/status",
        "body": {"value": "LIVE"},
    }
    msg = decode(json.dumps(seed))
    assert msg.to == "hyperty-runtime://sp1/protostub/123/status"
    assert msg.type == "update"
    assert msg.body == {"value": "LIVE"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"type":"read","to":"c:d"}', "from"),
        (b'{"from":"a:b","to":"c:d"}', "type"),
        (b'{"type":"read","from":"a:b"}', "to"),
        (b'{"type":"no spaces","from":"a:b","to":"c:d"}', "type"),
        (b'{"type":"","from":"a:b","to":"c:d"}', "type"),
        (b'{"type":"\\u212a","from":"a:b","to":"c:d"}', "type"),
        (b'{"type":"read","from":5,"to":"c:d"}', "from"),
        (b'{"type":"read","from":"a:b","to":["c:d","e:f"]}', "to"),
        (b'{"type":"read","from":"a:b","to":[]}', "to"),
        (b'{"type":"read","from":"a:b","to":""}', "to"),
        (b'{"type":"read","from":"","to":"c:d"}', "from"),
        (b'{"type":"read","from":"a:b","to":"c:d","body":"online"}', "body"),
        (b'{"type":"read","from":"a:b","to":"c:d","id":true}', "id"),
        (b'{"type":"read","from":"a:b","to":"c:d","id":1.5}', "id"),
    ],
)
def test_invalid_messages_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(raw)
    assert str(caught.value).startswith(f"{field}:")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b"42", b"{", b"\xff\xfe", b'{"type":"read"'])
def test_garbage_is_a_message_error(raw: bytes) -> None:
    with pytest.raises(MessageError):
        decode(raw)


def test_size_limit_default_and_configurable() -> None:
    small = encode(Message(type="update", from_="a:b", to="c:d", body={"pad": "x" * 100}))
    assert decode(small, max_size=len(small)).body == {"pad": "x" * 100}
    with pytest.raises(MessageError, match="^size:"):
        decode(small, max_size=len(small) - 1)
    big = encode(Message(type="update", from_="a:b", to="c:d", body={"pad": "x" * (1 << 20)}))
    with pytest.raises(MessageError, match="^size:"):
        decode(big)


def test_response_builder_swaps_addresses_and_keeps_id() -> None:
    request = Message(id="42", type="create", from_="hyperty://a.test/1", to="domain://msg-node.a.test/sm")
    answer = response(request, 200, value={"allocated": ["x"]}, runtimeToken="t")
    assert (answer.id, answer.type, answer.from_, answer.to) == ("42", "response", request.to, request.from_)
    assert answer.body == {"code": 200, "value": {"allocated": ["x"]}, "runtimeToken": "t"}
    assert response_code(answer) == 200
    assert not is_provisional(answer)
    assert is_provisional(response(request, 100))


def test_error_description_reads_both_spellings() -> None:
    assert error_description({"code": 500, "desc": "old"}) == "old"
    assert error_description({"code": 500, "description": "new", "desc": "old"}) == "new"
    assert error_description({"code": 500}) is None
    assert error_description(None) is None


def test_response_code_tolerates_string_codes() -> None:
    base = Message(type="response", from_="a:b", to="c:d")
    assert response_code(Message(type="response", from_="a:b", to="c:d", body={"code": "404"})) == 404
    assert response_code(Message(type="response", from_="a:b", to="c:d", body={"code": "2XX"})) is None
    assert response_code(base) is None


def test_constructor_validates_like_the_decoder() -> None:
    with pytest.raises(MessageError, match="^type:"):
        Message(type="no pe", from_="a:b", to="c:d")
    assert Message(type="EXECUTE", from_="a:b", to="c:d").type == "execute"


@pytest.mark.parametrize("kind", ["ping", "PONG", "Handshake", "x-custom.v2", "a" * 64])
def test_any_token_is_a_type_compared_case_insensitively_and_emitted_lower_case(kind: str) -> None:
    msg = decode(json.dumps({"type": kind, "from": "a:b", "to": "c:d"}))
    assert msg.type == kind.lower()
    assert json.loads(encode(msg))["type"] == kind.lower()


def test_types_protofly_gives_semantics_to() -> None:
    assert {"create", "read", "update", "delete", "subscribe", "unsubscribe", "response"} < TYPES
    assert {"forward", "execute", "open", "re-open", "close"} < TYPES
    assert "ping" not in TYPES


def test_batch_and_dict_forms() -> None:
    msgs = [Message(type="update", from_="a:b", to=f"c:{i}") for i in range(3)]
    assert [m.to for m in decode_batch(encode(msgs))] == ["c:0", "c:1", "c:2"]
    with pytest.raises(MessageError):
        decode_batch(b'[{"type":"update"}]')
    wire = as_dict(msgs[0])
    assert wire == {"type": "update", "from": "a:b", "to": "c:0"}
    assert from_dict(wire) == msgs[0]
    with pytest.raises(MessageError, match="^from:"):
        from_dict({"type": "update", "to": "x:y"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_message_error(raw: bytes) -> None:
    try:
        decode(raw)
    except MessageError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "type", "from", "to", "body", "resource", "x"]),
        json_values | st.sampled_from(["update", "RESPONSE", "a:b", ["c:d"]]),
    )
)
def test_random_json_objects_decode_or_raise_message_error(obj: dict) -> None:
    try:
        msg = decode(json.dumps(obj))
    except MessageError:
        return
    assert msg.type == obj["type"].lower() and msg.type.isascii()
    assert isinstance(msg.to, str) and msg.to
    assert isinstance(msg.from_, str) and msg.from_


def test_malformed_json_after_an_invalid_field_is_a_message_error() -> None:
    # the strict decoder stops at the invalid "to"; the tolerant fallback then reaches the malformed number
    with pytest.raises(MessageError, match="not a valid JSON"):
        decode('{"to": null, "id": Infinity}')
    with pytest.raises(MessageError, match="not a valid JSON"):
        decode_batch('[{"to": null, "id": Infinity}]')


def test_deeply_nested_body_is_a_message_error_or_accepted() -> None:
    deep = b'{"type":"read","from":"a:b","to":"c:d","body":{"x":' + b"[" * 100000 + b"]" * 100000 + b"}}"
    try:
        decode(deep, max_size=len(deep))
    except MessageError as exc:
        assert "json" in str(exc) or "body" in str(exc)
