"""Signatures, the trust store, key files and the verification policy (no network)."""

from __future__ import annotations

import base64
import hashlib
import json
import stat

import pytest

from protofly.catalogue import (
    E_DIGEST,
    E_SCHEMA,
    E_SIGNATURE,
    E_UNSIGNED,
    E_UNTRUSTED,
    CatalogueError,
    KeyFileError,
    SigningKey,
    TrustStore,
    canonical_bytes,
    generate_keypair,
    key_id,
    parse_descriptor,
    sign_descriptor,
    verify_stub,
)
from protofly.catalogue.keys import load_public_record
from protofly.catalogue.signing import parse_signature

SOURCE = b"class EchoStub:\n    pass\n"


@pytest.fixture(scope="module")
def key():
    return SigningKey.generate("b.test")


@pytest.fixture(scope="module")
def other():
    return SigningKey.generate("b.test")


@pytest.fixture
def trust(key):
    return TrustStore({"b.test": [key.public_text]})


def signed(key, **extra):
    raw = {
        "objectName": "echo",
        "version": "1.0.0",
        "language": "python",
        "publisher": "b.test",
        "sourcePackage": {"sourceCodeClassname": "EchoStub", "sha256": hashlib.sha256(SOURCE).hexdigest()},
        **extra,
    }
    return sign_descriptor(raw, key)


def verify(raw, trust, source=SOURCE, policy="require", domain="b.test", name=None):
    return verify_stub(
        parse_descriptor(raw), source, trust=trust, policy=policy, signer_domain=domain, requested_name=name
    )


def test_signature_format_and_roundtrip(key, trust):
    raw = signed(key)
    scheme, ident, encoded = raw["signature"].split(":")
    assert scheme == "ed25519" and ident == key.key_id == key_id(key.public_raw)
    assert len(ident) == 16 and len(base64.b64decode(encoded)) == 64
    verdict = verify(raw, trust)
    assert verdict.signer == key.key_id
    assert verdict.sha256 == hashlib.sha256(SOURCE).hexdigest()
    assert verdict.warnings == ()


def test_embedding_the_source_keeps_the_signature_valid(key, trust):
    raw = signed(key)
    raw["sourcePackage"] = {**raw["sourcePackage"], "sourceCode": SOURCE.decode(), "encoding": "utf-8"}
    assert verify(raw, trust).signer == key.key_id
    raw["sourcePackage"]["sourceCode"] = base64.b64encode(SOURCE).decode()
    raw["sourcePackage"]["encoding"] = "base64"
    assert canonical_bytes(raw) == canonical_bytes(signed(key))


def test_canonical_bytes_ignore_key_order_and_whitespace(key):
    raw = signed(key, configuration={"b": 1, "a": [1, 2]})
    shuffled = json.loads(json.dumps(dict(reversed(list(raw.items())))))
    assert canonical_bytes(shuffled) == canonical_bytes(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"version": "1.0.1"},
        {"configuration": {"url": "wss://evil/ws"}},
        {"sourcePackage": {"sourceCodeClassname": "EchoStub", "sha256": "0" * 64}},
        {"sandbox": {"memoryMB": 4096}},
        {"egress": ["ws://evil.test:443/ws"]},
    ],
)
def test_any_covered_change_breaks_the_signature(key, trust, change):
    raw = {**signed(key), **change}
    with pytest.raises(CatalogueError) as info:
        verify(raw, trust)
    assert info.value.code == E_SIGNATURE


def test_a_widened_egress_breaks_the_signature(key, trust):
    raw = signed(key, egress=["ws://node.b.test:443/ws"])
    assert verify(raw, trust).signer == key.key_id
    tampered = {**raw, "egress": ["ws://node.b.test:443/ws", "tcp://catalogue.a.test:443"]}
    with pytest.raises(CatalogueError) as info:
        verify(tampered, trust)
    assert info.value.code == E_SIGNATURE


def test_tampered_source_is_a_digest_error(key, trust):
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), trust, source=SOURCE + b"import os\n")
    assert info.value.code == E_DIGEST
    assert "sha256" in str(info.value)


def test_unknown_key_is_untrusted(other, trust):
    with pytest.raises(CatalogueError) as info:
        verify(signed(other), trust)
    assert info.value.code == E_UNTRUSTED
    assert other.key_id in str(info.value)


def test_key_pinned_for_another_domain_is_untrusted(key):
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), TrustStore({"c.test": [key.public_raw]}))
    assert info.value.code == E_UNTRUSTED


def test_publisher_must_be_the_signing_domain(key):
    trust = TrustStore({"c.test": [key.public_raw]})
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), trust, domain="c.test")
    assert info.value.code == E_UNTRUSTED and "published by b.test" in str(info.value)


def test_no_trust_store_is_untrusted(key):
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), None)
    assert info.value.code == E_UNTRUSTED


def test_signed_descriptor_must_pin_its_source(key, trust):
    raw = sign_descriptor({"objectName": "echo", "language": "python", "version": "1"}, key)
    with pytest.raises(CatalogueError) as info:
        verify(raw, trust)
    assert info.value.code == E_SCHEMA and "sourcePackage.sha256" in str(info.value)


def test_signed_name_must_match_the_request(key, trust):
    assert verify(signed(key), trust, name="default").signer  # the alias may name any stub
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), trust, name="other")
    assert info.value.code == E_SCHEMA and "objectName" in str(info.value)


UNSIGNED = {"objectName": "default", "language": "javascript", "configuration": {"url": "wss://x/ws"}}


def test_unsigned_under_each_policy(trust):
    with pytest.raises(CatalogueError) as info:
        verify(UNSIGNED, trust)
    assert info.value.code == E_UNSIGNED and "'warn'" in str(info.value)
    verdict = verify(UNSIGNED, trust, policy="warn", name="other")
    assert verdict.signer is None
    assert any("UNSIGNED" in w for w in verdict.warnings)
    assert any("not pinned" in w for w in verdict.warnings)
    assert any("served as 'other'" in w for w in verdict.warnings)
    assert verify(UNSIGNED, None, policy="off").signer is None


def test_policy_warn_still_rejects_a_bad_signature(key, trust):
    raw = {**signed(key), "version": "9"}
    with pytest.raises(CatalogueError) as info:
        verify(raw, trust, policy="warn")
    assert info.value.code == E_SIGNATURE


def test_policy_off_still_checks_the_digest(key):
    with pytest.raises(CatalogueError) as info:
        verify(signed(key), None, source=b"other", policy="off")
    assert info.value.code == E_DIGEST


@pytest.mark.parametrize(
    "text",
    ["", "rsa:abc:def", "ed25519:abc", "ed25519::AAAA", "ed25519:abc:not-base64!", "ed25519:abc:" + "A" * 8],
)
def test_malformed_signatures(text):
    with pytest.raises(CatalogueError) as info:
        parse_signature(text)
    assert info.value.code == E_SIGNATURE


def test_malformed_signature_in_descriptor(key, trust):
    raw = {**signed(key), "signature": "ed25519:" + key.key_id + ":AAAA"}
    with pytest.raises(CatalogueError) as info:
        verify(raw, trust)
    assert info.value.code == E_SIGNATURE


# -- key files and the trust store -----------------------------------------------------------------------


def test_generate_keypair_files(tmp_path):
    private, public = generate_keypair(tmp_path / "keys", "B.Test")
    assert private.name == "b.test.key" and public.name == "b.test.pub.json"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = SigningKey.load(private, "b.test")
    domain, raw = load_public_record(public)
    assert domain == "b.test" and raw == loaded.public_raw
    assert json.loads(public.read_text())["key_id"] == loaded.key_id
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "keys", "b.test")


def test_load_bad_private_keys(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        SigningKey.load(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(KeyFileError, match="PEM"):
        SigningKey.load(tmp_path / "junk.key")


def test_public_record_with_wrong_key_id(tmp_path, key):
    record = {**key.public_record(), "key_id": "0000000000000000"}
    path = tmp_path / "x.pub.json"
    path.write_text(json.dumps(record))
    with pytest.raises(KeyFileError, match="does not match"):
        load_public_record(path)


def test_trust_store_roundtrip(tmp_path, key, other):
    store = TrustStore()
    store.add("b.test", key.public_raw)
    store.add("B.TEST", other.public_text)
    store.add("a.test", base64.b64encode(key.public_raw).decode())
    path = tmp_path / "trust.json"
    store.save(path)
    loaded = TrustStore.load(path)
    assert loaded.domains() == ["a.test", "b.test"]
    assert loaded.key_ids("b.test") == sorted([key.key_id, other.key_id])
    assert loaded.is_trusted("a.test", key.key_id) and not loaded.is_trusted("a.test", other.key_id)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", "not JSON"),
        ("[]", "domains"),
        ('{"domains": {"b.test": "x"}}', "expected a list"),
        ('{"domains": {"b.test": ["ed25519:AAAA"]}}', "32 bytes"),
        ('{"domains": {"b.test": ["###"]}}', "not base64"),
        ('{"domains": {"b test": ["ed25519:' + base64.b64encode(b"x" * 32).decode() + '"]}}', "b test"),
    ],
)
def test_bad_trust_store_files(tmp_path, content, words):
    path = tmp_path / "trust.json"
    path.write_text(content)
    with pytest.raises(KeyFileError) as info:
        TrustStore.load(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_missing_trust_store(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        TrustStore.load(tmp_path / "nope.json")
