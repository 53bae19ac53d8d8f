"""Addresses: parsing, the domain that serves an address, and the well-known catalogue URLs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protofly import address
from protofly.address import AddressError


@pytest.mark.parametrize(
    ("url", "kind", "domain"),
    [
        ("hyperty://b.test/123", "hyperty", "b.test"),
        ("hyperty-runtime://a.test/rt/protostub/3", "hyperty-runtime", "a.test"),
        ("runtime://a.test/protostub/x", "hyperty-runtime", "a.test"),
        ("domain://msg-node.b.test/address-allocation", "domain", "b.test"),
        ("domain://registry.B.Test", "domain", "b.test"),
        ("domain-idp://google.com", "domain-role", "google.com"),
        ("global://registry/", "global", None),
        ("user://twitter.com/pchainho", "user", "twitter.com"),
        ("comm://c.test/room", "comm", "c.test"),
        ("hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/default", "catalogue", "catalogue.b.test"),
        ("mn:/session", "message-node", None),
        ("slack://someone@slack.com", "other", "slack.com"),
        ("hyperty://localhost:9090/x", "hyperty", "localhost"),
        ("hyperty://msg-node./x", "hyperty", "msg-node."),
    ],
)
def test_kind_and_serving_domain(url: str, kind: str, domain: str | None) -> None:
    if domain == "msg-node.":
        with pytest.raises(AddressError):
            address.parse(url)
        return
    assert address.kind(url) == kind
    assert address.serving_domain(url) == domain


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "no-scheme",
        "://x",
        "1abc://x",
        "hyperty:/x",
        "hyperty://",
        "hyperty://a..b/x",
        "hyperty://-a.b/",
        "hyperty://a b/",
        "hyperty://x:0/",
        "hyperty://x:70000/",
        "domain://[zz]/",
        "hyperty://a.test/\n",
        "x" * 3000,
    ],
)
def test_garbage_addresses_raise(bad: str) -> None:
    with pytest.raises(AddressError):
        address.parse(bad)


def test_non_string_is_an_address_error() -> None:
    with pytest.raises(AddressError):
        address.parse(42)  # type: ignore[arg-type]


@given(st.text(max_size=60))
def test_random_text_parses_or_raises_address_error(text: str) -> None:
    try:
        parsed = address.parse(text)
    except AddressError:
        return
    assert parsed.scheme


def test_runtime_stub_and_status_urls() -> None:
    runtime = address.runtime_url("A.Test", "abc")
    assert runtime == "hyperty-runtime://a.test/abc"
    stub = address.stub_url(runtime, 3)
    assert stub == "hyperty-runtime://a.test/abc/protostub/3"
    assert address.status_url(stub) == stub + "/status"
    assert address.is_within(stub, runtime)
    assert address.is_within(runtime, runtime)
    assert not address.is_within("hyperty-runtime://a.test/abcdef", runtime)
    with pytest.raises(AddressError):
        address.runtime_url("a.test", "a/b")
    with pytest.raises(AddressError):
        address.stub_url(runtime, 0)
    with pytest.raises(AddressError):
        address.runtime_url("bad domain", "x")


def test_well_known_urls_in_both_layouts() -> None:
    assert address.catalogue_url("b.test") == "https://catalogue.b.test/.well-known/protocolstub/default"
    assert address.catalogue_url("b.test", "sip") == "https://catalogue.b.test/.well-known/protocolstub/sip"
    assert address.static_url("b.test") == "https://b.test/.well-known/protocolstub/default.ps.json"
    assert address.home_fallback_url("a.test", "b.test") == "https://catalogue.a.test/.well-known/protocolstub/b.test"
    base = "http://127.0.0.1:8080/"
    assert address.catalogue_url("b.test", base=base) == "http://127.0.0.1:8080/.well-known/protocolstub/default"
    assert address.static_url("b.test", base=base) == "http://127.0.0.1:8080/.well-known/protocolstub/default.ps.json"
    for bad_name in ["../etc", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(AddressError):
            address.catalogue_url("b.test", bad_name)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("b.test", ("b.test", "default")),
        ("B.TEST", ("b.test", "default")),
        ("hyperty-catalogue://catalogue.b.test/.well-known/protocolstub/sip", ("b.test", "sip")),
        ("https://catalogue.b.test/.well-known/protostub/default", ("b.test", "default")),
        ("https://b.test/.well-known/protocolstub/x.ps.json", ("b.test", "x")),
        ("https://b.test", ("b.test", "default")),
    ],
)
def test_split_stub_reference(reference: str, expected: tuple[str, str]) -> None:
    assert address.split_stub_reference(reference) == expected


@pytest.mark.parametrize("bad", ["", "b test", "https://b.test/somewhere/else", "mn:/session"])
def test_split_stub_reference_rejects_garbage(bad: str) -> None:
    with pytest.raises(AddressError):
        address.split_stub_reference(bad)
