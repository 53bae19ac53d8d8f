"""Bounded fuzzing of every decoder (run by ``make test``): only the documented error type may escape.

Each test draws hostile input from :mod:`tests.fuzz.inputs` and hands it to a target of
:mod:`tests.fuzz.targets`, which lets exactly the decoder's documented exception pass and checks what the
decoder accepted.  ``max_examples`` keeps the whole set under 20 seconds; ``make fuzz`` runs the same
targets for as long as one likes (atheris, or Hypothesis when atheris is not installed).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.fuzz import inputs, targets

#: ``PROTOFLY_FUZZ_EXAMPLES`` raises the budget for a long run (``make fuzz`` without atheris).
SCALE = max(1, int(os.environ.get("PROTOFLY_FUZZ_EXAMPLES", "1")))
FUZZ = settings(
    max_examples=100 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
FEW = settings(FUZZ, max_examples=40 * SCALE)


@FUZZ
@given(inputs.MESSAGES)
def test_message_decode(data):
    targets.message_decode(data)


@FUZZ
@given(inputs.MESSAGES)
def test_message_decode_batch(data):
    targets.message_decode_batch(data)


@FUZZ
@given(inputs.MESSAGES)
def test_message_decode_frame(data):
    targets.message_decode_frame(data)


@FUZZ
@given(inputs.objects(inputs.MESSAGE_KEYS) | inputs.values(inputs.MESSAGE_KEYS))
def test_message_from_dict(value):
    targets.message_from_dict(value)


@FUZZ
@given(inputs.MESSAGES)
def test_node_core_text_and_binary_frames(data):
    targets.node_frames(data)


@FUZZ
@given(
    st.lists(inputs.MESSAGES, max_size=3).map(
        lambda items: b"".join(
            len(raw).to_bytes(4, "big") + raw
            for raw in (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item for item in items)
        )
    )
    | st.binary(max_size=64)
)
def test_sandbox_channel_frame_decoder(stream):
    targets.channel_frames(stream)


@FUZZ
@given(inputs.DESCRIPTORS)
def test_descriptor_text(data):
    targets.descriptor(data)


@FUZZ
@given(inputs.objects(inputs.DESCRIPTOR_KEYS))
def test_descriptor_value(value):
    targets.descriptor_value(value)


@FUZZ
@given(inputs.http_heads())
def test_catalogue_server_request_head(data):
    targets.http_head(data)


@FUZZ
@given(inputs.MESSAGES)
def test_admin_send_body(data):
    targets.admin_send(data)


@FEW
@given(inputs.toml_texts() | inputs.CONFIG_TEXTS)
def test_config_file_and_environment(data):
    targets.config_file(data)


@FUZZ
@given(inputs.objects(inputs.CONFIG_KEYS) | inputs.values(inputs.CONFIG_KEYS))
def test_config_mapping(value):
    targets.config_mapping(value)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
@pytest.mark.parametrize(
    "data",
    [
        '{"type":"create","from":"a\ud800","to":"b"}',  # the lone surrogate of the issue
        b'{"type":"create","from":"a\xff","to":"b"}',  # invalid UTF-8
        b'{"type":"create","from":"a:b","to":"c:d","body":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"type":"create","from":"a:b","to":"c:d","id":' + b"9" * 5000 + b"}",
        b'{"type":5,"from":"a:b","to":"c:d"}',
        b"[" * 100_000,
    ],
    ids=["surrogate", "utf8", "deep", "huge", "wrong-type", "open-arrays"],
)
def test_the_inputs_of_the_issue_against_every_target(name, data):
    targets.TARGETS[name](data)
