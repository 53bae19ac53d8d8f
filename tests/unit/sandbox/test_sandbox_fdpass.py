"""Passing sockets over the SOCK_SEQPACKET pair: claimed by tag; abandoned ones are closed, not leaked."""

from __future__ import annotations

import json
import socket

import pytest

from protofly.sandbox.fdpass import (
    SocketInbox,
    drain_acks,
    node_socket_pair,
    send_node_handle,
    send_socket,
    socket_pair,
)


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


_NODE_RECEIVER = """
process.on('message', (msg, handle) => {
  handle.end(JSON.stringify(msg));
});
"""


def test_a_node_process_takes_a_socket_on_its_ipc_channel_and_acknowledges_it():
    """The framing of send_node_handle against a real Node.js: the socket arrives as a net.Socket."""
    from protofly.sandbox.node import node_executable

    node = node_executable()
    if node is None:
        pytest.skip("Node.js is not installed")
    import subprocess

    runtime_end, host_end = node_socket_pair()
    mine, theirs = socket.socketpair()
    env = {"NODE_CHANNEL_FD": str(host_end.fileno()), "NODE_CHANNEL_SERIALIZATION_MODE": "json"}
    child = subprocess.Popen([node, "-e", _NODE_RECEIVER], env=env, pass_fds=[host_end.fileno()])
    host_end.close()
    try:
        send_node_handle(runtime_end, "42", theirs)
        theirs.close()
        mine.settimeout(10)
        received = b""
        while chunk := mine.recv(4096):
            received += chunk
        assert json.loads(received) == {"protofly": "egress", "id": "42"}
        runtime_end.setblocking(True)
        runtime_end.settimeout(10)
        ack = runtime_end.recv(4096)
        assert b'"cmd":"NODE_HANDLE_ACK"' in ack
        runtime_end.setblocking(False)
        assert drain_acks(runtime_end) == (True, 0)
    finally:
        child.kill()
        child.wait(10)
        runtime_end.close()
        mine.close()
    with pytest.raises(ValueError):
        send_node_handle(runtime_end, "", mine)
