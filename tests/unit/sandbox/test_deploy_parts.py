"""The sandbox step's parts: the runtime's own timings, and the host's where they are plausible."""

from __future__ import annotations

from protofly.message import Message
from protofly.sandbox.deploy_parts import sandbox_parts


def answer(value: object) -> Message:
    return Message(
        type="response",
        from_="x://sandbox/internal",
        to="x://sandbox/external",
        id=1,
        body={"code": 200, "value": value},
    )


def test_the_host_s_figures_are_parts_and_the_channel_is_the_rest_of_the_round_trip() -> None:
    parts = sandbox_parts(0.0002, 0.010, answer({"ms": {"confine": 0.8, "load": 7.5}}))
    assert parts == {"limits": 0.2, "confine": 0.8, "load": 7.5, "channel": 1.7}


def test_implausible_host_figures_are_left_out_not_shown() -> None:
    told = {"confine": -1, "load": 60_000, "extra": 1.0}  # negative; longer than the whole round trip
    assert sandbox_parts(0.0, 0.010, answer({"ms": told})) == {"limits": 0.0, "channel": 10.0}
    told = {"confine": True, "load": "7"}  # not numbers
    assert sandbox_parts(0.0, 0.010, answer({"ms": told})) == {"limits": 0.0, "channel": 10.0}
    assert sandbox_parts(0.0, 0.010, answer(None)) == {"limits": 0.0, "channel": 10.0}
