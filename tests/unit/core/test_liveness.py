"""The liveness decisions without time or processes: when a live status expires, which pongs refresh it."""

from __future__ import annotations

import pytest

from protofly.config import ConfigError, RuntimeConfig, parse_listen_address
from protofly.liveness import LivenessPolicy, expiry, pong_refreshes
from protofly.registry import StubRecord
from protofly.stub import Bus, ProtoStub, pong

POLICY = LivenessPolicy(ping_interval=1.0, ping_timeout=1.0, status_ttl=240.0, status_ttl_after_error=60.0)


def record(*statuses: str) -> StubRecord:
    stub = StubRecord("b.test", "hyperty-runtime://a.test/r/protostub/1")
    for value in statuses:
        assert stub.machine.report(value).applied
    return stub


def test_a_live_status_expires_after_its_ttl_from_the_last_refresh() -> None:
    stub = record("deploying", "live")
    stub.live_at = 100.0
    assert expiry(stub, POLICY) == 340.0
    stub.live_after_error = True
    assert expiry(stub, POLICY) == 160.0


@pytest.mark.parametrize(
    "statuses", [(), ("deploying",), ("deploying", "in-progress"), ("deploying", "live", "expired")]
)
def test_only_a_live_status_has_an_expiry(statuses: tuple[str, ...]) -> None:
    stub = record(*statuses)
    stub.live_at = 100.0
    assert expiry(stub, POLICY) is None


@pytest.mark.parametrize(
    ("answer", "refreshes"),
    [({"state": "live"}, True), ({"state": "disconnected"}, False), ({}, False), (None, False)],
)
def test_only_an_sdk_answer_saying_live_refreshes(answer: dict | None, refreshes: bool) -> None:
    assert pong_refreshes(answer) is refreshes


def test_the_sdk_answers_with_a_protostubs_connection_state() -> None:
    sent = []
    stub = ProtoStub("hyperty-runtime://a.test/r/protostub/1", Bus(sent.append))
    assert pong(stub) == {"state": "created"}
    stub.status("live")
    assert pong(stub) == {"state": "live"}
    assert pong(object()) == {}  # a stub without the SDK base class: proves its loop runs, nothing more
    assert pong(None) == {}


def test_liveness_and_listener_settings_are_checked() -> None:
    config = RuntimeConfig(domain="a.test", ping_interval=0.5, metrics_address="127.0.0.1:9464")
    assert config.metrics_address == "127.0.0.1:9464" and config.console_address is None
    with pytest.raises(ConfigError, match="ping_timeout: must be positive"):
        RuntimeConfig(domain="a.test", ping_timeout=0)
    with pytest.raises(ConfigError, match="console_address: expected HOST:PORT, got 'localhost'"):
        RuntimeConfig(domain="a.test", console_address="localhost")
    with pytest.raises(ConfigError, match="metrics_address: port must be a number"):
        RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_METRICS_ADDRESS": "127.0.0.1:http"})
    assert (
        RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_CONSOLE_ADDRESS": ""}).console_address
        is None
    )
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert parse_listen_address("9465") == ("127.0.0.1", 9465)  # a bare port: loopback
