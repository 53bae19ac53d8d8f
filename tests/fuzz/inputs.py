"""Hypothesis strategies for hostile input: almost-valid JSON messages and the ways they break.

Random bytes alone rarely get past a JSON parser's first byte, so most inputs here start as a real message
(or descriptor, or config) and are then bent: wrong types, lone surrogates (raw in a ``str`` and as JSON
escapes), invalid UTF-8, nesting past any parser's limit, numbers out of every range, truncation, arrays
where an object is expected.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

#: Field names the decoders look at, so generated objects hit their checks and not only "missing field".
MESSAGE_KEYS = ["id", "type", "from", "to", "body", "resource", "code", "value", "batch", "via", "x"]
DESCRIPTOR_KEYS = [
    *("objectName", "version", "language", "sourcePackage", "sourceCode", "sourceCodeClassname", "encoding"),
    *("sha256", "configuration", "constraints", "interworking", "sandbox", "memoryMB", "signature", "publisher"),
    *("cguid", "idpProxy", "description", "sourcePackageURL"),
]
CONFIG_KEYS = [
    *("domain", "state_dir", "catalogues", "policy", "sandbox", "memory_mb", "deploy_timeout", "backoff_base"),
    *("backoff_cap", "max_message_size", "sandbox_preload", "allow_http_loopback", "restart", "x"),
]

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
#: Text that includes lone surrogates, control characters and non-ASCII letters.
TEXT = st.text(st.characters(codec=None) | SURROGATES, max_size=12) | st.sampled_from(
    ["create", "READ", "ping", "response", "open", "re-open", "a:b", "c:d", "hyperty://b.test/x", "", "\u212a"]
)
#: Python refuses to print the last one (4,300 digits at most): code that formats a number must not crash.
NUMBERS = (
    st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**40])
    | st.builds(pow, st.just(10), st.just(5000))  # built, not listed: Hypothesis itself would fail to print it
    | st.floats(allow_nan=True)
)


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    """Nested JSON-ish Python values whose objects use ``keys``."""
    scalars = st.none() | st.booleans() | NUMBERS | TEXT
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(keys) | TEXT, inner, max_size=5),
        max_leaves=12,
    )


def objects(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), values(keys), max_size=len(keys))


def _dumps(value: Any, ascii_only: bool) -> str:
    try:
        return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    except ValueError:  # an integer too long to print: the "huge" bending below makes long ones in text
        return "{}"


@st.composite
def _bent(draw: st.DrawFn, keys: list[str]) -> bytes | str:
    """A JSON text of an object (or a list of them) that may then be broken in one of many ways."""
    value: Any = draw(objects(keys))
    if draw(st.booleans()):
        value = [*draw(st.lists(objects(keys), max_size=3)), value]
    text = _dumps(value, draw(st.booleans()))
    how = draw(st.sampled_from(["keep", "truncate", "splice", "nest", "huge", "escape", "bytes", "bom", "array"]))
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=4) | SURROGATES) + text[at:]
    elif how == "nest":
        depth = draw(st.sampled_from([10, 300, 1500]))
        text = text[:-1] + ',"body":' + "[" * depth + "]" * depth + "}" if text.endswith("}") else "[" * depth + text
    elif how == "huge":
        text = text.replace("1", "1" + "9" * draw(st.sampled_from([20, 400, 5000])), 1)
    elif how == "escape":
        text = text.replace('"', '"\\ud800', 1) if draw(st.booleans()) else text.replace('"', '"\\udc00\\ud800', 1)
    elif how == "array":
        text = f"[{text},{text}]"
    if how == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    if how == "bytes" or draw(st.booleans()):
        data = text.encode("utf-8", "surrogatepass")  # a str's lone surrogates become invalid UTF-8 bytes
        if data and draw(st.booleans()):
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at + 1 :]
        return data
    return text


def json_inputs(keys: list[str]) -> st.SearchStrategy[bytes | str]:
    """Bent JSON text (most of the time), random bytes and random text (the rest)."""
    return _bent(keys) | st.binary(max_size=200) | st.text(st.characters(codec=None) | SURROGATES, max_size=60)


MESSAGES = json_inputs(MESSAGE_KEYS)
DESCRIPTORS = json_inputs(DESCRIPTOR_KEYS)
CONFIG_TEXTS = st.text(max_size=80).map(lambda s: s.encode()) | st.sampled_from(
    [b'domain = "x"\n[catalogues]\n"b.test" = 5\n', b"memory_mb = 1e999\n", b"[sandbox]\nx = [[[[1]]]]\n"]
)


@st.composite
def toml_texts(draw: st.DrawFn) -> bytes:
    """A TOML document of known settings with hostile values, or JSON text (for the environment)."""
    lines = []
    for key, value in draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), values(CONFIG_KEYS), max_size=5)).items():
        try:
            rendered = json.dumps(value, allow_nan=False)
        except ValueError:  # NaN, or an integer too long to print
            rendered = "nan"
        lines.append(f"{key} = {rendered}")
    text = "\n".join(lines)
    if draw(st.booleans()):
        text = _dumps(draw(values(CONFIG_KEYS)), True)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def http_heads(draw: st.DrawFn) -> bytes:
    """A request head (without its blank line) with hostile methods, targets, versions and fields."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"BREW", b"F@O", b""]) | st.binary(max_size=6))
    target = draw(st.sampled_from([b"/", b"/.well-known/protocolstub/x?y#z", b"*", b"a.b:443", b"http://h/p"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b""]) | st.binary(max_size=9))
    fields = draw(
        st.lists(
            st.sampled_from([b"Host: x", b" folded", b"Content-Length: 5", b"Content-Length: 6", b"X:\x01"])
            | st.binary(max_size=20),
            max_size=10,
        )
    )
    line = draw(st.sampled_from([b" ", b"  ", b"\t"])).join([method, target, version])
    return b"\r\n".join([line, *fields]) + (b"a" * draw(st.sampled_from([0, 300])))
