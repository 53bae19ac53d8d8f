"""Descriptor model: tolerant parsing of real reTHINK shapes, strict validation of what the runtime uses."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protofly.catalogue import (
    E_SCHEMA,
    E_TOO_LARGE,
    CatalogueError,
    DescriptorError,
    compare_versions,
    parse_descriptor,
    parse_source_package,
)
from protofly.catalogue.model import SandboxLimits

MINIMAL = {"objectName": "echo", "language": "python"}


def descriptor(**fields):
    return {**MINIMAL, **fields}


def test_minimal_descriptor_gets_defaults():
    d = parse_descriptor(json.dumps(MINIMAL))
    assert d.object_name == "echo"
    assert d.version == ""
    assert d.configuration == {} and d.constraints == {}
    assert d.interworking is False
    assert d.source_package is None and d.source_classname is None
    assert d.sandbox_limits is None and d.signature is None
    assert d.is_python


@pytest.mark.parametrize(
    ("wire", "expected"), [("1.0", "1.0"), (1.0, "1.0"), (2, "2"), (18.699999999999996, "18.699999999999996")]
)
def test_version_as_number_or_string(wire, expected):
    assert parse_descriptor(descriptor(version=wire)).version == expected


def test_catalogue_era_descriptor_with_empty_arrays_and_embedded_base64_source():
    code = b"function activate(url, bus, config) { return {name: 'x'}; }"
    raw = descriptor(
        cguid=40001,
        type="ProtoStubs",
        version="0.1",
        objectName="VertxProtoStub",
        language="javascript",
        sourcePackageURL="/sourcePackage",
        configuration={"url": "wss://msg-node.example/ws"},
        constraints=[],
        messageSchemas=[],
        dataObjects=[],
        policies=[],
        sourcePackage={
            "sourceCode": base64.b64encode(code).decode(),
            "sourceCodeClassname": "VertxProtoStub",
            "encoding": "base64",
            "signature": "",
        },
    )
    d = parse_descriptor(raw)
    assert d.cguid == "40001"
    assert d.constraints == {}
    assert d.source_classname == "VertxProtoStub"
    assert d.source_package.decode() == (code, None)
    assert d.extra == {"policies": []}
    assert d.raw is raw


def test_configuration_as_json_string_is_an_object():
    d = parse_descriptor(descriptor(configuration='{"url": "wss://x/ws"}'))
    assert d.configuration == {"url": "wss://x/ws"}


def test_leading_whitespace_and_bom_are_accepted():
    text = b"\xef\xbb\xbf  \n " + json.dumps(MINIMAL).encode()
    assert parse_descriptor(text).object_name == "echo"


def test_unknown_fields_are_kept():
    d = parse_descriptor(descriptor(name="IMSIWProtoStub", accessControlPolicy="somePolicy"))
    assert d.extra == {"name": "IMSIWProtoStub", "accessControlPolicy": "somePolicy"}
    assert d.summary()["unknownFields"] == ["accessControlPolicy", "name"]


def test_capitalised_interworking_and_string_booleans():
    assert parse_descriptor(descriptor(Interworking=True)).interworking is True
    assert parse_descriptor(descriptor(interworking="true")).interworking is True
    assert parse_descriptor(descriptor(idpProxy="False")).idp_proxy is False


def test_sandbox_limits_parsed():
    d = parse_descriptor(descriptor(sandbox={"memoryMB": 64, "cpuSeconds": 5, "openFiles": 32}))
    assert d.sandbox_limits == SandboxLimits(memory_mb=64, cpu_seconds=5, open_files=32)
    assert d.sandbox_limits.as_wire() == {"memoryMB": 64, "cpuSeconds": 5, "openFiles": 32}
    assert parse_descriptor(descriptor(sandbox={"memoryMB": 64})).sandbox_limits == SandboxLimits(memory_mb=64)


@pytest.mark.parametrize("key", ["memoryMB", "memoryMb", "memory_mb"])
def test_sandbox_memory_limit_in_every_documented_spelling(key):
    d = parse_descriptor(descriptor(sandbox={key: 128}))
    assert d.sandbox_limits == SandboxLimits(memory_mb=128)
    assert d.summary()["sandbox"] == {"memoryMB": 128}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"objectName": None}, "objectName", "missing"),
        ({"objectName": 5}, "objectName", "expected a string"),
        ({"objectName": "../etc"}, "objectName", "letters"),
        ({"language": None}, "language", "missing"),
        ({"language": ""}, "language", "non-empty"),
        ({"version": True}, "version", "string or a number"),
        ({"version": "1 0"}, "version", "not a version"),
        ({"configuration": 5}, "configuration", "got a number"),
        ({"configuration": [1]}, "configuration", "got an array"),
        ({"configuration": "nope"}, "configuration", "not JSON"),
        ({"configuration": "[1]"}, "configuration", "JSON string holding an array"),
        ({"constraints": "x"}, "constraints", "not JSON"),
        ({"interworking": "yes"}, "interworking", "true or false"),
        ({"description": 3}, "description", "expected a string"),
        ({"signature": 3}, "signature", "expected a string"),
        ({"sourcePackage": 3}, "sourcePackage", "expected an object"),
        ({"sourcePackage": {"sourceCode": 1}}, "sourcePackage.sourceCode", "expected a string"),
        ({"sourcePackage": {"sourceCodeClassname": "a b"}}, "sourcePackage.sourceCodeClassname", "class name"),
        ({"sourcePackage": {"sha256": "abc"}}, "sourcePackage.sha256", "64 hex"),
        ({"sourcePackage": {"encoding": 5}}, "sourcePackage.encoding", "expected a string"),
        ({"sandbox": 5}, "sandbox", "expected an object"),
        ({"sandbox": {"memoryGB": 5}}, "sandbox.memoryGB", "unknown limit"),
        ({"sandbox": {"memoryMB": 0}}, "sandbox.memoryMB", "out of range"),
        ({"sandbox": {"cpuSeconds": True}}, "sandbox.cpuSeconds", "positive integer"),
        ({"sandbox": {"openFiles": "8"}}, "sandbox.openFiles", "positive integer"),
        ({"publisher": "B TEST"}, "publisher", "domain"),
        ({"requirements": "slixmpp"}, "requirements", "list"),
        ({"requirements": [3]}, "requirements[0]", "expected a string"),
        ({"requirements": ["slixmpp", "not a requirement!"]}, "requirements[1]", "not a requirement"),
        ({"requirements": ["x"] * 33}, "requirements", "at most 32"),
        ({"cguid": [1]}, "cguid", "string or a number"),
    ],
)
def test_bad_fields_are_named(fields, field, words):
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(descriptor(**fields))
    assert info.value.code == E_SCHEMA
    assert info.value.field == field
    assert str(info.value).startswith(f"E_SCHEMA: {field}: ")
    assert words in str(info.value)


@pytest.mark.parametrize("text", [b"", b"not json", b"[1, 2]", b'"string"', b"{"])
def test_not_an_object(text):
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(text, url="https://b.test/x")
    assert info.value.url == "https://b.test/x"
    assert "https://b.test/x" in str(info.value)


def test_size_limit():
    with pytest.raises(CatalogueError) as info:
        parse_descriptor(json.dumps(descriptor(description="x" * 2000)), max_size=1000)
    assert info.value.code == E_TOO_LARGE


def test_url_is_added_to_field_errors():
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(json.dumps(descriptor(configuration=5)), url="https://b.test/d")
    assert info.value.field == "configuration" and info.value.url == "https://b.test/d"


# -- source packages -------------------------------------------------------------------------------------


def test_plain_source_declared_base64_falls_back_with_a_warning():
    code = "class HelloWorld { constructor() { this.x = 1; } }"
    package = parse_source_package({"sourceCodeClassname": "HelloWorld", "encoding": "base64", "sourceCode": code})
    source, warning = package.decode()
    assert source == code.encode()
    assert "base64" in warning


def test_sha256_decides_between_readings():
    # "abcd" is valid base64 *and* plausible text: the digest picks the plain reading.
    digest = hashlib.sha256(b"abcd").hexdigest()
    package = parse_source_package({"encoding": "base64", "sourceCode": "abcd", "sha256": digest})
    assert package.decode()[0] == b"abcd"
    digest = hashlib.sha256(base64.b64decode("abcd")).hexdigest()
    package = parse_source_package({"encoding": "base64", "sourceCode": "abcd", "sha256": digest})
    assert package.decode() == (base64.b64decode("abcd"), None)


@pytest.mark.parametrize("encoding", [None, "UTF-8", "utf-8", "UTF8"])
def test_plain_encodings(encoding):
    package = parse_source_package({"sourceCode": "x = 1", "encoding": encoding})
    assert package.decode() == (b"x = 1", None)


def test_base64_with_line_breaks():
    code = b"print('hi')\n" * 20
    text = base64.encodebytes(code).decode()
    assert "\n" in text
    assert parse_source_package({"sourceCode": text, "encoding": "base64"}).decode() == (code, None)


def test_package_without_code_cannot_decode():
    package = parse_source_package({"sourceCodeClassname": "X", "sha256": "0" * 64})
    with pytest.raises(DescriptorError) as info:
        package.decode()
    assert info.value.field == "sourcePackage.sourceCode"


def test_empty_package_is_an_error_when_served_alone():
    with pytest.raises(DescriptorError):
        parse_source_package(b"{}")


# -- versions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.10", "1.9", 1),
        ("1.0", "1.0.0", 0),
        ("1.0.0-rc1", "1.0.0", -1),
        ("", "0.1", -1),
        ("2", "1.9.9", 1),
        ("0.1", "0.1", 0),
        ("1.0.1", "1.0", 1),
    ],
)
def test_compare_versions(a, b, order):
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


versions = st.lists(st.integers(0, 50), min_size=1, max_size=4).map(lambda parts: ".".join(map(str, parts)))


@given(versions, versions)
def test_compare_versions_matches_numeric_tuples(a, b):
    def key(v):
        parts = [int(p) for p in v.split(".")]
        return parts + [0] * (4 - len(parts))

    expected = (key(a) > key(b)) - (key(a) < key(b))
    assert compare_versions(a, b) == expected


def test_requirements_are_kept_in_order():
    parsed = parse_descriptor(descriptor(requirements=["slixmpp>=1.8", "aiomqtt"]))
    assert parsed.requirements == ("slixmpp>=1.8", "aiomqtt")
    assert parse_descriptor(descriptor()).requirements == ()
