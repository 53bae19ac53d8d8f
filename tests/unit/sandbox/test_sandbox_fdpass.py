"""Passing sockets over the SOCK_SEQPACKET pair: claimed by tag; abandoned ones are closed, not leaked."""

from __future__ import annotations

import socket

import pytest

from protofly.sandbox.fdpass import SocketInbox, send_socket, socket_pair


def test_a_socket_is_claimed_by_its_tag_and_an_abandoned_one_is_closed():
    runtime_end, host_end = socket_pair()
    inbox = SocketInbox(host_end)
    wanted, wanted_peer = socket.socketpair()
    abandoned, abandoned_peer = socket.socketpair()
    try:
        send_socket(runtime_end, "7", abandoned)
        send_socket(runtime_end, "8", wanted)
        abandoned.close()
        wanted.close()  # the runtime's copies go; the host holds its own
        claimed = inbox.claim("8", pending=[])
        assert claimed is not None and not claimed.getblocking()
        claimed.sendall(b"ping")
        assert wanted_peer.recv(4) == b"ping"
        # "7" was neither claimed nor pending: closed, so its peer sees the end of the stream.
        assert abandoned_peer.recv(4) == b""
        assert inbox.claim("7") is None
        claimed.close()
    finally:
        inbox.close()
        runtime_end.close()
        wanted_peer.close()
        abandoned_peer.close()


def test_a_tag_must_be_short_and_non_empty():
    runtime_end, host_end = socket_pair()
    try:
        with pytest.raises(ValueError, match="tag must be 1-64 bytes"):
            send_socket(runtime_end, "", runtime_end)
    finally:
        runtime_end.close()
        host_end.close()
