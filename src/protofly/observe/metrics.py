"""The runtime's Prometheus metrics: per stub (labels ``domain``, ``stub_url``) and runtime-wide.

Two sources, one registry per runtime (never the process-global one, so two runtimes in a process — the
demo, a test — do not collide):

* counters and gauges read at scrape time from what the runtime already counts (each
  :class:`~protofly.registry.StubRecord`'s counters and status, the runtime's admission and liveness
  counters) plus the stub's memory, CPU and process count as its cgroup accounts them (``/proc`` where
  it has none; :mod:`protofly.observe.usage`);
* histograms and counters of events (:mod:`protofly.events`): deploy step durations per seed step, whole
  deployments, outcomes, crashes.

:data:`METRICS` lists every series (name, type, labels, meaning); ``docs/operations.md`` documents each of
them and a test checks that it does.  ``prometheus_client`` is imported here only, and this module only when
a metrics listener is asked for, so the command line stays fast to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protofly import status
from protofly.events import CrashLoop, DeployFailed, DeployStep, RuntimeEvent, StubCrashed, StubLive
from protofly.observe.usage import read_all
from protofly.sandbox import active_layers

if TYPE_CHECKING:
    from protofly.runtime import Runtime

__all__ = ["CONTENT_TYPE", "METRICS", "MetricDoc", "RuntimeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every status a stub can be in (the state set of ``protofly_stub_status``).
STATUSES = (
    "deploying",
    "deployed",
    "deployment-failed",
    "created",
    "in-progress",
    "live",
    "disconnected",
    "failed",
    "expired",
)
#: Seconds: deploy steps take from a millisecond (registry) to seconds (a slow catalogue).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

STUB = ("domain", "stub_url")


@dataclass(frozen=True, slots=True)
class MetricDoc:
    """One exported series: its name (as scraped), type, labels and meaning (the docs table's row)."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


#: ``counter name in StubRecord.counters`` → (metric, extra label value or None, help).
_DROPS = {
    "dropped_to_stub": "not_reading",
    "messages_rate_limited": "rate_limited",
    "status_rate_limited": "status_rate_limited",
    "oversized_frames": "oversized_frame",
    "invalid_frames": "invalid_frame",
}
_FORGED = {"forged_from": "sender", "forged_responses": "response", "forbidden_destination": "destination"}

METRICS: tuple[MetricDoc, ...] = (
    MetricDoc("protofly_stub_info", "gauge", (*STUB, "name", "layers"), "1 per stub: its name and isolation layers"),
    MetricDoc("protofly_stub_status", "gauge", (*STUB, "status"), "1 for the stub's current status, 0 for the others"),
    MetricDoc("protofly_stub_status_since_seconds", "gauge", STUB, "Unix time the current status was applied"),
    MetricDoc("protofly_stub_up", "gauge", STUB, "1 while the stub is live (or expired: still forwarding), else 0"),
    MetricDoc("protofly_stub_messages_in_total", "counter", STUB, "messages the runtime handed to the stub"),
    MetricDoc("protofly_stub_messages_out_total", "counter", STUB, "messages the stub sent to the runtime"),
    MetricDoc("protofly_stub_bytes_in_total", "counter", STUB, "bytes written to the stub's sandbox channel"),
    MetricDoc("protofly_stub_bytes_out_total", "counter", STUB, "bytes read from the stub's sandbox channel"),
    MetricDoc(
        "protofly_stub_dropped_total",
        "counter",
        (*STUB, "reason"),
        "messages dropped: not_reading, rate_limited, status_rate_limited, oversized_frame, invalid_frame",
    ),
    MetricDoc(
        "protofly_stub_forged_total",
        "counter",
        (*STUB, "kind"),
        "messages refused at the trust boundary: forged sender, forged response, forbidden destination",
    ),
    MetricDoc("protofly_stub_status_anomalies_total", "counter", STUB, "status reports the status machine refused"),
    MetricDoc("protofly_stub_status_changes_total", "counter", STUB, "status changes applied"),
    MetricDoc("protofly_stub_log_lines_dropped_total", "counter", STUB, "stub output lines over the log budget"),
    MetricDoc("protofly_stub_restarts_total", "counter", STUB, "restarts after a crash"),
    MetricDoc("protofly_stub_unresponsive_total", "counter", STUB, "times the stub's loop did not answer a ping"),
    MetricDoc("protofly_stub_status_expired_total", "counter", STUB, "times its live status expired"),
    MetricDoc("protofly_stub_queued_messages", "gauge", STUB, "messages held while the stub deploys or restarts"),
    MetricDoc("protofly_stub_cpu_seconds_total", "counter", STUB, "CPU seconds (user+system) of the stub's processes"),
    MetricDoc("protofly_stub_memory_bytes", "gauge", STUB, "memory the stub's cgroup accounts for"),
    MetricDoc("protofly_stub_processes", "gauge", STUB, "processes in the stub's sandbox"),
    MetricDoc("protofly_deploy_step_seconds", "histogram", ("domain", "step", "seed"), "duration of one deploy step"),
    MetricDoc("protofly_deploy_seconds", "histogram", ("domain",), "trigger to live of a successful deployment"),
    MetricDoc("protofly_deploys_total", "counter", ("domain", "outcome"), "deployments ended: live or failed"),
    MetricDoc("protofly_stub_crashes_total", "counter", ("domain",), "crashes of a live stub (incl. unresponsive)"),
    MetricDoc("protofly_runtime_stubs", "gauge", (), "stub records in the runtime"),
    MetricDoc("protofly_runtime_deploys_refused_total", "counter", (), "deployments refused by the admission bounds"),
    MetricDoc("protofly_runtime_negative_cache_hits_total", "counter", (), "messages answered from the negative cache"),
    MetricDoc("protofly_runtime_pings_total", "counter", (), "liveness pings sent to stubs"),
    MetricDoc("protofly_runtime_pongs_total", "counter", (), "liveness pings answered"),
)

_DOC = {doc.name.removesuffix("_total"): doc for doc in METRICS}


def _family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    doc = _DOC[name]
    if doc.type == "counter":
        return CounterMetricFamily(name, doc.help, labels=list(doc.labels))
    return GaugeMetricFamily(name, doc.help, labels=list(doc.labels))


@dataclass(frozen=True, slots=True)
class _StubView:
    """What one scrape reads of a stub, copied on the event loop."""

    domain: str
    url: str
    name: str
    status: str | None
    since: float
    layers: str
    up: bool
    counters: dict[str, int]
    restarts: int
    queued: int
    pid: int | None


class _Snapshot(Collector):
    """Yields the scrape-time families from the snapshot :meth:`RuntimeMetrics.render` took."""

    def __init__(self) -> None:
        self.stubs: list[_StubView] = []
        self.usage: dict[str, dict[str, Any]] = {}
        self.runtime: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        names = ("protofly_stub_info", "protofly_stub_status", "protofly_stub_status_since_seconds", "protofly_stub_up")
        info, state, since, up = (_family(n) for n in names)
        simple = {
            "messages_to_stub": _family("protofly_stub_messages_in"),
            "messages_from_stub": _family("protofly_stub_messages_out"),
            "bytes_to_stub": _family("protofly_stub_bytes_in"),
            "bytes_from_stub": _family("protofly_stub_bytes_out"),
            "status_anomalies": _family("protofly_stub_status_anomalies"),
            "history_total": _family("protofly_stub_status_changes"),
            "log_lines_dropped": _family("protofly_stub_log_lines_dropped"),
            "unresponsive": _family("protofly_stub_unresponsive"),
            "status_expired": _family("protofly_stub_status_expired"),
        }
        dropped, forged = _family("protofly_stub_dropped"), _family("protofly_stub_forged")
        restarts, queued = _family("protofly_stub_restarts"), _family("protofly_stub_queued_messages")
        cpu, memory, processes = (
            _family(n) for n in ("protofly_stub_cpu_seconds", "protofly_stub_memory_bytes", "protofly_stub_processes")
        )
        for stub in self.stubs:
            key = [stub.domain, stub.url]
            info.add_metric([*key, stub.name, stub.layers], 1)
            for value in STATUSES:
                state.add_metric([*key, value], 1 if stub.status == value else 0)
            since.add_metric(key, stub.since)
            up.add_metric(key, 1 if stub.up else 0)
            for counter, family in simple.items():
                family.add_metric(key, stub.counters.get(counter, 0))
            for counter, reason in _DROPS.items():
                dropped.add_metric([*key, reason], stub.counters.get(counter, 0))
            for counter, kind in _FORGED.items():
                forged.add_metric([*key, kind], stub.counters.get(counter, 0))
            restarts.add_metric(key, stub.restarts)
            queued.add_metric(key, stub.queued)
            usage = self.usage.get(stub.domain)
            if usage is not None:
                for family, value in (
                    (cpu, usage["cpu_seconds"]),
                    (memory, usage["memory_bytes"]),
                    (processes, usage["processes"]),
                ):
                    if value is not None:  # None: this kernel does not count it
                        family.add_metric(key, value)
        yield from (info, state, since, up, *simple.values(), dropped, forged, restarts, queued, cpu, memory, processes)
        stubs = _family("protofly_runtime_stubs")
        stubs.add_metric([], len(self.stubs))
        yield stubs
        for name, counter in (
            ("protofly_runtime_deploys_refused", "deploys_refused"),
            ("protofly_runtime_negative_cache_hits", "negative_cache_hits"),
            ("protofly_runtime_pings", "pings"),
            ("protofly_runtime_pongs", "pongs"),
        ):
            family = _family(name)
            family.add_metric([], self.runtime.get(counter, 0))
            yield family


class RuntimeMetrics:
    """The metrics of one runtime: subscribe to its events now, render the exposition text on each scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        doc = _DOC["protofly_deploy_step_seconds"]
        self.steps = Histogram(doc.name, doc.help, list(doc.labels), buckets=STEP_BUCKETS, registry=self.registry)
        doc = _DOC["protofly_deploy_seconds"]
        self.deploys_seconds = Histogram(
            doc.name, doc.help, list(doc.labels), buckets=STEP_BUCKETS, registry=self.registry
        )
        doc = _DOC["protofly_deploys"]
        self.deploys = Counter(doc.name, doc.help, list(doc.labels), registry=self.registry)
        doc = _DOC["protofly_stub_crashes"]
        self.crashes = Counter(doc.name, doc.help, list(doc.labels), registry=self.registry)
        self._unsubscribe = runtime.events.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def _on_event(self, event: RuntimeEvent) -> None:
        match event:
            case DeployStep(domain=domain, step=step, seed=seed, ms=ms):
                self.steps.labels(domain, step, seed).observe(ms / 1000)
            case StubLive(domain=domain, total_ms=ms):
                self.deploys_seconds.labels(domain).observe(ms / 1000)
                self.deploys.labels(domain, "live").inc()
            case DeployFailed(domain=domain):
                self.deploys.labels(domain, "failed").inc()
            case StubCrashed(domain=domain) | CrashLoop(domain=domain):
                self.crashes.labels(domain).inc()
            case _:
                pass

    def _views(self) -> list[_StubView]:
        runtime = self.runtime
        views = []
        for record in runtime.stubs():
            phase = runtime.phase(record.domain)
            pid = record.info.get("pid")
            views.append(
                _StubView(
                    domain=record.domain,
                    url=record.url,
                    name=record.name,
                    status=record.status,
                    since=record.since,
                    layers="+".join(active_layers(record.isolation)),
                    up=phase is not None and phase.value in (status.LIVE, status.EXPIRED),
                    counters=record.counters,
                    restarts=record.restarts,
                    queued=runtime.queued(record.domain),
                    pid=pid if isinstance(pid, int) and record.status not in (None, "deployment-failed") else None,
                )
            )
        return views

    async def usage(self, views: list[_StubView]) -> dict[str, dict[str, Any]]:
        pids = [(view.domain, view.pid) for view in views if view.pid is not None]
        return await asyncio.to_thread(read_all, self.runtime, pids) if pids else {}

    async def render(self) -> bytes:
        """The exposition text: state copied on the loop, ``/proc`` read in a thread, then rendered."""
        views = self._views()
        usage = await self.usage(views)
        snapshot = self._snapshot
        snapshot.stubs, snapshot.usage = views, usage
        liveness = self.runtime.liveness
        snapshot.runtime = {**self.runtime.counters, **(liveness.counters if liveness is not None else {})}
        return generate_latest(self.registry)
