"""The message node's Prometheus metrics and health, served beside ``/ws`` (``/metrics``, ``/healthz``, ``/readyz``).

Gauges are read at scrape time from the core's tables (sessions, addresses, subscriptions, buffered
messages for detached sessions, open connections); counters are the core's protocol counters and the
shell's I/O counters, exported as ``protofly_msgnode_<name>_total``.  :data:`NODE_METRICS` lists every series
for the documentation (``docs/operations.md``; a test checks it).  ``prometheus_client`` is imported when
the node starts serving, never by the command line's ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protofly.msgnode.core import MessageNodeCore

__all__ = ["CONTENT_TYPE", "GAUGES", "NODE_METRICS", "node_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MessageNode(Protocol):
    """What the metrics read of a node: described here so that the server, which serves them, is not imported."""

    @property
    def domain(self) -> str: ...
    @property
    def core(self) -> MessageNodeCore: ...
    @property
    def counters(self) -> dict[str, int]: ...
    @property
    def stats(self) -> dict[str, int]: ...


#: Gauges: (name, meaning, how to read it from the node).
GAUGES: tuple[tuple[str, str, Callable[[MessageNode], float]], ...] = (
    ("protofly_msgnode_sessions", "runtime sessions (attached or detached)", lambda n: n.core.session_count),
    ("protofly_msgnode_sessions_detached", "sessions waiting for a re-open", lambda n: _detached(n)),
    ("protofly_msgnode_open_connections", "open WebSocket connections", lambda n: n.counters["open_connections"]),
    ("protofly_msgnode_addresses", "allocated addresses", lambda n: n.core.address_count),
    ("protofly_msgnode_subscriptions", "subscriptions of all sessions", lambda n: _sum(n, "subscription_count")),
    ("protofly_msgnode_buffered_messages", "messages held for detached sessions", lambda n: _buffered(n)),
    ("protofly_msgnode_buffered_bytes", "bytes held for detached sessions", lambda n: _sum(n, "buffer_bytes")),
    ("protofly_msgnode_queue_peak_bytes", "largest send queue seen", lambda n: n.stats["queue_peak_bytes"]),
    ("protofly_msgnode_draining", "1 while the node drains before stopping", lambda n: int(n.core.draining)),
)
_PEAKS = frozenset({"queue_peak_bytes", "transport_peak_bytes"})
#: Counter names (each exported as ``protofly_msgnode_<name>_total``) and what they count.
COUNTERS = {
    "connections": "WebSocket connections accepted",
    "messages_in": "messages received",
    "delivered": "messages delivered to a session",
    "fanout_deliveries": "deliveries of published messages to subscribers",
    "invalid": "frames that were not valid messages",
    "slow_consumers": "connections closed (1013) because they did not read",
    "buffered": "messages buffered for a detached session",
    "buffer_full": "messages refused (503) because a session's buffer was full",
    "sessions_opened": "sessions opened",
    "sessions_expired": "detached sessions expired",
    "frames_in": "WebSocket frames read",
    "bytes_in": "bytes read",
    "messages_out": "messages written",
    "bytes_out": "bytes written",
}

NODE_METRICS: tuple[tuple[str, str, str], ...] = (
    *((name, "gauge", meaning) for name, meaning, _ in GAUGES),
    ("protofly_msgnode_<counter>_total", "counter", "every protocol and I/O counter of the node, by name"),
)


def _detached(node: MessageNode) -> int:
    return sum(1 for session in node.core.sessions if session.conn is None)


def _sum(node: MessageNode, field: str) -> int:
    return sum(int(getattr(session, field)) for session in node.core.sessions)


def _buffered(node: MessageNode) -> int:
    return sum(len(session.buffer) for session in node.core.sessions)


class _NodeCollector(Collector):
    def __init__(self, node: MessageNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        labels = ["domain"]
        for name, meaning, read in GAUGES:
            gauge = GaugeMetricFamily(name, meaning, labels=labels)
            gauge.add_metric([node.domain], read(node))
            yield gauge
        for name, count in sorted(node.counters.items()):
            if name in _PEAKS or name in ("open_connections", "sessions", "addresses"):
                continue
            counter = CounterMetricFamily(
                f"protofly_msgnode_{name}", COUNTERS.get(name, name.replace("_", " ")), labels=labels
            )
            counter.add_metric([node.domain], count)
            yield counter


def node_metrics(node: MessageNode) -> Callable[[], bytes]:
    """A function rendering the node's metrics (a registry of its own: several nodes may share a process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_NodeCollector(node))
    return lambda: generate_latest(registry)
