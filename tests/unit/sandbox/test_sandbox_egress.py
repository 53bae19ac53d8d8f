"""The egress endpoint model and the broker's checks, without a sandbox (real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import pytest

from protofly.catalogue import DescriptorError, parse_descriptor
from protofly.config import ConfigError, RuntimeConfig
from protofly.sandbox.broker import EgressBroker, EgressPolicy
from protofly.sandbox.egress import Endpoint, EndpointError, parse_egress, parse_endpoint
from protofly.stub import EgressError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ws://node.b.test/ws", Endpoint("ws", "node.b.test", 80, "/ws")),
        ("WSS://Node.B.test/ws", Endpoint("wss", "node.b.test", 443, "/ws")),
        ("tcp://xmpp.c.test:5222", Endpoint("tcp", "xmpp.c.test", 5222)),
        ("tls://[::1]:5223", Endpoint("tls", "::1", 5223)),
        ("https://127.0.0.1:8443/api", Endpoint("https", "127.0.0.1", 8443, "/api")),
    ],
)
def test_endpoints_are_normalised(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tcp://xmpp.c.test", "tcp:// needs an explicit port"),
        ("ftp://x.test:21", "scheme must be one of ws, wss, http, https, tcp, tls, got 'ftp'"),
        ("ws://user:pw@x.test/ws", "credentials in the URL are not allowed"),
        ("ws://x.test:99999/", "is not a URL"),
        ("ws://x.test/ws?token=1", "a query or fragment is not allowed"),
        ("ws:///ws", "no host"),
        ("ws://bad_host!/ws", "is not a host name or an IP address"),
        ("tcp://x.test:1/path", "a tcp:// endpoint has no path"),
        (42, "expected a URL string, got int"),
    ],
)
def test_malformed_endpoints_say_what_is_wrong(text, problem):
    with pytest.raises(EndpointError, match=problem.replace("?", r"\?")):
        parse_endpoint(text)


def test_the_descriptor_field_is_validated_naming_the_item():
    base = {"objectName": "s", "language": "python"}
    assert parse_descriptor(base).egress == ()
    parsed = parse_descriptor({**base, "egress": ["ws://node.b.test:443/ws", "tcp://xmpp.c.test:5222"]})
    assert [str(e) for e in parsed.egress] == ["ws://node.b.test:443/ws", "tcp://xmpp.c.test:5222"]
    assert parsed.summary()["egress"] == ["ws://node.b.test:443/ws", "tcp://xmpp.c.test:5222"]
    with pytest.raises(DescriptorError) as info:
        parse_descriptor({**base, "egress": ["ws://ok.test/ws", "tcp://no-port.test"]})
    assert info.value.field == "egress[1]"
    assert "tcp:// needs an explicit port" in str(info.value)
    with pytest.raises(DescriptorError) as info:
        parse_descriptor({**base, "egress": "ws://ok.test/ws"})
    assert info.value.field == "egress"
    with pytest.raises(EndpointError, match="at most 64"):
        parse_egress([f"tcp://h{i}.test:1" for i in range(65)])


def test_the_hosts_map_is_checked():
    config = RuntimeConfig(domain="a.test", hosts={"Node.B.test": "127.0.0.1"})
    assert config.hosts == {"node.b.test": "127.0.0.1"}
    with pytest.raises(ConfigError, match="hosts: node.b.test must map to an IP address, got 'localhost'"):
        RuntimeConfig(domain="a.test", hosts={"node.b.test": "localhost"})
    loaded = RuntimeConfig.load(environ={"PROTOFLY_DOMAIN": "a.test", "PROTOFLY_HOSTS": '{"n.b.test": "::1"}'})
    assert loaded.hosts == {"n.b.test": "::1"}


async def test_the_broker_opens_declared_endpoints_and_counts_refusals():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    counters: dict[str, int] = {}
    policy = EgressPolicy((parse_endpoint(f"tcp://node.b.test:{port}"),), hosts={"node.b.test": "127.0.0.1"})
    broker = EgressBroker(policy, counters)
    try:
        sock = await broker.connector(f"tcp://node.b.test:{port}")
        assert sock.getpeername() == ("127.0.0.1", port) and not sock.getblocking()
        sock.close()
        with pytest.raises(EgressError) as info:
            await broker.connector(f"tcp://other.b.test:{port}")
        assert info.value.code == 403 and "not declared" in str(info.value)
        unmapped = EgressBroker(
            EgressPolicy((parse_endpoint(f"tcp://nowhere.b.test:{port}"),), resolver_only=True), counters
        )
        with pytest.raises(EgressError, match="not in the runtime's hosts map") as info:
            await unmapped.connector(f"tcp://nowhere.b.test:{port}")
        assert info.value.code == 502
        assert counters == {"egress_opened": 1, "egress_refused": 2}
    finally:
        server.close()
        await server.wait_closed()


async def test_a_bus_without_a_connector_has_no_network():
    from protofly.stub import Bus

    with pytest.raises(EgressError, match="no network") as info:
        await Bus(lambda msg: None).open_connection("tcp://x.test:1")
    assert info.value.code == 403 and isinstance(info.value, ConnectionError)
