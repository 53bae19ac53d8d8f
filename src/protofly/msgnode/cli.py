"""``protofly msg-node``: run the reference message node from the command line."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from protofly.address import AddressError, validate_domain
from protofly.msgnode.acks import DEFAULT_ACK_DELAY
from protofly.msgnode.core import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFER_MESSAGES,
    DEFAULT_MAX_FRAME,
    DEFAULT_SEND_QUEUE,
    DEFAULT_SEND_QUEUE_BYTES,
)
from protofly.msgnode.remote import ClusterUnavailable
from protofly.msgnode.snapshot import StateError

app = typer.Typer(help="The reference reTHINK message node (Vert.x protocol over WebSocket).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """The reference reTHINK message node (Vert.x protocol over WebSocket)."""


@app.command()
def serve(
    domain: Annotated[
        str, typer.Option("--domain", help="Domain served: components live at domain://msg-node.<domain>/.")
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: pick a free one; the URL is printed).")] = 9090,
    session_grace: Annotated[
        float, typer.Option("--session-grace", help="Seconds a session outlives its socket, waiting for a re-open.")
    ] = 30.0,
    auth_token: Annotated[
        list[str] | None,
        typer.Option(
            "--auth-token",
            envvar="PROTOFLY_MSG_NODE_AUTH_TOKENS",
            help="Accept 'open' only with this body.accessToken (repeatable; env: whitespace-separated).",
        ),
    ] = None,
    auth_tokens_file: Annotated[
        Path | None,
        typer.Option("--auth-tokens-file", help="File with one accepted access token per line (keeps them out of ps)."),
    ] = None,
    max_frame: Annotated[int, typer.Option("--max-frame", help="Largest frame in bytes (close 1009).")] = (
        DEFAULT_MAX_FRAME
    ),
    send_queue: Annotated[int, typer.Option("--send-queue", help="Messages queued per connection.")] = (
        DEFAULT_SEND_QUEUE
    ),
    send_queue_bytes: Annotated[
        int, typer.Option("--send-queue-bytes", help="Bytes queued per connection before disconnecting it.")
    ] = DEFAULT_SEND_QUEUE_BYTES,
    ping_interval: Annotated[
        float, typer.Option("--ping-interval", help="Seconds between WebSocket pings (0: off).")
    ] = 20.0,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            help="Load sessions, addresses, subscriptions and buffered messages from this file at start (if it "
            "exists; it is then renamed <name>.loaded) and write them there at a graceful stop.",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Durable state: every change is journaled in this directory before the node acts on it, so a "
            "node killed (even with SIGKILL) and restarted with the same directory loses nothing it acknowledged.",
        ),
    ] = None,
    fsync_interval: Annotated[
        float,
        typer.Option(
            "--fsync-interval",
            help="With --state-dir: seconds between fsyncs of the journal (power-loss window; 0: every write, "
            "-1: never).",
        ),
    ] = 1.0,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", help="Seconds a stop waits for drain clients to say 'drained'.")
    ] = 5.0,
    drain_grace: Annotated[
        float, typer.Option("--drain-grace", help="Seconds clients without the drain extension get at a stop.")
    ] = 0.2,
    buffer_messages: Annotated[
        int, typer.Option("--buffer-messages", help="Messages kept per detached session for its re-open.")
    ] = DEFAULT_BUFFER_MESSAGES,
    buffer_bytes: Annotated[
        int, typer.Option("--buffer-bytes", help="Bytes kept per detached session for its re-open.")
    ] = DEFAULT_BUFFER_BYTES,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            help="Join the domain's node cluster through these NATS servers (nats://host:port, comma separated; "
            "JetStream on). Without it the node is a single process and needs no NATS.",
        ),
    ] = None,
    node_id: Annotated[
        str | None, typer.Option("--node-id", help="This node's name in the cluster (default: a random one).")
    ] = None,
    ack_delay: Annotated[
        float,
        typer.Option(
            "--ack-delay",
            min=0.0,
            help="Seconds an ack (ack extension) may wait for data going to the same client before it is sent "
            "alone (0: at once).",
        ),
    ] = DEFAULT_ACK_DELAY,
) -> None:
    """Serve the message node until SIGINT or SIGTERM; prints its ws:// URL on stdout once listening.

    A stop drains first (see docs/msgnode.md); with --state-file a restarted node keeps every session.
    Exit code 2 when the state file cannot be loaded or saved.
    """
    try:
        domain = validate_domain(domain)
    except AddressError as exc:
        raise typer.BadParameter(str(exc), param_hint="--domain") from None
    tokens = list(auth_token or [])
    if auth_tokens_file is not None:
        try:
            lines = auth_tokens_file.read_text().splitlines()
        except OSError as exc:
            hint = "--auth-tokens-file"
            raise typer.BadParameter(f"cannot read {auth_tokens_file}: {exc}", param_hint=hint) from None
        tokens.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if state_dir is not None and state_file is not None:
        raise typer.BadParameter("use --state-dir or --state-file, not both", param_hint="--state-dir")
    from protofly.msgnode.server import MessageNode  # aiohttp is imported only when a node runs

    node = MessageNode(
        domain,
        host,
        port,
        session_grace=session_grace,
        auth_tokens=tokens or None,
        max_frame=max_frame,
        send_queue=send_queue,
        send_queue_bytes=send_queue_bytes,
        ping_interval=ping_interval or None,
        state_file=state_file,
        state_dir=state_dir,
        fsync_interval=None if fsync_interval < 0 else fsync_interval,
        drain_timeout=drain_timeout,
        drain_grace=drain_grace,
        buffer_messages=buffer_messages,
        buffer_bytes=buffer_bytes,
        cluster=cluster,
        node_id=node_id,
        ack_delay=ack_delay,
    )
    if cluster is not None and (state_file is not None or state_dir is not None):
        hint = "--state-file" if state_file is not None else "--state-dir"
        raise typer.BadParameter("a clustered node keeps its state in the cluster", param_hint=hint)
    try:
        asyncio.run(_serve(node))
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ClusterUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


#: Container allocations between two young-generation collections in the node process (CPython: 700).
GC_THRESHOLD = (20_000, 20, 20)


def tune_gc() -> None:
    """The node process's garbage collector, set for a message router (measured: docs/benchmarks.md).

    Routing allocates a few short-lived containers per message (the decoded message, its body, the
    actions); at CPython's default every 700 of them a collection walks the young objects, about 0.5 us
    per routed message.  What start-up built is frozen (never walked again) and collections run 30 times
    less often.  The node's own records hold no reference cycles (sessions, tables and unacknowledged
    messages are freed by reference counting); the few a connection's objects form are collected later,
    not never.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def _serve(node: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with node:
        tune_gc()
        typer.echo(node.url)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=3600)
            except TimeoutError:
                continue
