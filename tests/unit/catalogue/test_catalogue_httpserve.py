"""The catalogue server's request-head parser, sans-I/O: bytes in, a head or the status to answer out."""

from __future__ import annotations

import pytest

from protofly.catalogue.httpserve import HeadError, body_length, parse_head

LIMITS = {"max_line_size": 100, "max_field_size": 50, "max_headers": 4}


def test_a_head_is_parsed_with_lower_case_names_and_a_decoded_path():
    head = parse_head(b'GET /a%20b?x=1 HTTP/1.1\r\nHost: x\r\nIf-None-Match: "e"\r\nX-A: 1\r\nx-a: 2', **LIMITS)
    assert (head.method, head.target, head.path, head.version) == ("GET", "/a%20b?x=1", "/a b", (1, 1))
    assert head.headers == {"host": "x", "if-none-match": '"e"', "x-a": "1, 2"} and head.keep_alive
    assert body_length(head) == 0


@pytest.mark.parametrize(
    ("target", "path"), [(b"*", None), (b"example.com:443", None), (b"http://h:1/p/q?z", "/p/q"), (b"/", "/")]
)
def test_targets_of_every_form(target, path):
    assert parse_head(b"OPTIONS " + target + b" HTTP/1.1", **LIMITS).path == path


def test_keep_alive_follows_the_version_and_connection_header():
    assert not parse_head(b"GET / HTTP/1.0", **LIMITS).keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive", **LIMITS).keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close", **LIMITS).keep_alive


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"GET /" + b"a" * 100 + b" HTTP/1.1", 414, "request line of"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 50, 431, "header field of"),
        (b"GET / HTTP/1.1" + b"\r\nX: 1" * 5, 431, "at most 4"),
        (b"GET / HTTP/3.0", 505, "HTTP/3.0"),
        (b"GET / HTTP/x", 400, "no HTTP version"),
        (b"GET /  HTTP/1.1", 400, "expected"),
        (b"G\x00T / HTTP/1.1", 400, "not a token"),
        (b"GET /a\x00b HTTP/1.1", 400, "percent-encoded"),
        (b"GET /\xc3\xa9 HTTP/1.1", 400, "percent-encoded"),
        (b"GET / HTTP/1.1\r\n folded", 400, "folding"),
        (b"GET / HTTP/1.1\r\nBad Name: x", 400, "not a token"),
        (b"GET / HTTP/1.1\r\nX: a\x7fb", 400, "control characters"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2", 400, "twice"),
    ],
)
def test_a_bad_head_names_its_status(data, status, words):
    with pytest.raises(HeadError) as caught:
        parse_head(data, **LIMITS)
    assert caught.value.status == status and words in caught.value.text


def test_body_length():
    assert body_length(parse_head(b"POST / HTTP/1.1\r\nContent-Length: 12", **LIMITS)) == 12
    assert body_length(parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked", **LIMITS)) is None
    with pytest.raises(HeadError, match="not a number"):
        body_length(parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1", **LIMITS))
