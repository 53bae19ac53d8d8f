"""How the admin API's data looks: the JSON a stub is shown as, the NDJSON lines of a deploy stream, and the
terminal rendering of both (tables, progress lines, the deploy timeline).

Both directions live here so that what the server writes and what the CLI reads are defined side by side:
the server turns typed runtime events into lines (:func:`event_line`, :func:`live_result`,
:func:`failed_result`); the CLI turns lines back into text (:func:`progress_text`, :class:`DeployView`).
The client side dispatches on the line's ``event`` with ``match``, as an in-process observer of
:class:`protofly.events.EventStream` does on the event's type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from protofly.events import RuntimeEvent, StatusChanged, as_json
from protofly.sandbox import active_layers

if TYPE_CHECKING:
    from rich.status import Status

    from protofly.deploy import StubHandle
    from protofly.registry import StubRecord

__all__ = [
    "STEPS",
    "DeployView",
    "Line",
    "ago",
    "console",
    "event_line",
    "failed_result",
    "history_table",
    "live_result",
    "progress_text",
    "stub_table",
    "stub_view",
    "timeline",
    "usage_cells",
]

#: One NDJSON line of a deploy stream, as written and as read back: ``{"event": <kind>, ...}``.
Line = dict[str, Any]

#: The deploy steps in the order the Runtime UA reports them: the spinner shows the one in progress.
STEPS = ("registry", "catalogue", "sandbox", "connect", "live")

_STATUS_COLOURS = {"live": "green", "failed": "red", "deployment-failed": "red", "disconnected": "yellow"}


# -- the server's side: JSON out of runtime objects -----------------------------------------------------------


def stub_view(record: StubRecord, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stub as the admin API shows it: the registry's summary, its status history, its process id and what
    its process tree uses now (``usage``, from its cgroup: :meth:`protofly.Runtime.usage`; null without one)."""
    view = record.summary()
    view["history"] = [dataclasses.asdict(event) for event in record.history]
    view["pid"] = record.info.get("pid")
    view["usage"] = usage
    return view


def event_line(event: RuntimeEvent, now: float) -> Line:
    """A runtime event as a deploy-stream line, stamped with when it happened (``at``, epoch seconds)."""
    line = as_json(event)
    match event:
        case StatusChanged():
            pass  # it carries the registry's own timestamp: the one its history shows
        case _:
            line["at"] = now
    return line


def live_result(handle: StubHandle) -> Line:
    """The last line of a deployment that went live: the stub as :func:`stub_view` shows it, plus its timeline."""
    return {
        "event": "result",
        "ok": True,
        **stub_view(handle.record),
        "version": handle.version,
        "signer": handle.signer,
        "catalogue_url": handle.catalogue_url,
        "from_cache": handle.from_cache,
        "steps": [dataclasses.asdict(step) for step in handle.steps],
        "total_ms": round(handle.total_ms, 3),
    }


def failed_result(
    domain: str, code: int, description: str, *, cause: str | None = None, record: StubRecord | None = None
) -> Line:
    """The last line of a deployment that did not go live: the code and reason, and the stub's history if any.

    ``cause`` (the catalogue's or the sandbox's error code, e.g. ``E_UNTRUSTED``) is null when there is none,
    so a script can read it without checking for the key.
    """
    result: Line = {"event": "result", "ok": False, "domain": domain, "code": code, "description": description}
    result["cause"] = cause
    if record is not None:
        result["history"] = stub_view(record)["history"]
        result["url"] = record.url
    return result


# -- the CLI's side: text out of JSON -------------------------------------------------------------------------


def console() -> Console:
    """A rich console on stdout; written to a pipe or a file it does not wrap at 80 columns (logs, scripts)."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, width=200)
    return out


def progress_text(line: Line) -> str | None:
    """One deploy-stream line as one line of progress, or None for a line the others already say."""
    match line:
        case {"event": "status"}:
            description = f": {line['description']}" if line.get("description") else ""
            return f"  status    {line.get('value')}{description}"
        case {"event": "step"}:
            detail = f"  {line['detail']}" if line.get("detail") else ""
            return f"  ✓ {line.get('step', '?'):<10}{line.get('ms', 0):>9.1f} ms{detail}"
        case {"event": "live" | "deployment-failed"}:
            return None  # the status lines (and the final outcome) already say it
        case _:
            details = {k: v for k, v in line.items() if k not in ("event", "domain", "stub_url", "at")}
            pairs = " ".join(f"{k}={v}" for k, v in details.items())
            return f"  ! {line.get('event')}  {pairs}".rstrip()


def timeline(lines: list[Line]) -> Table:
    """The deploy stream as a table: when each line came (ms from the first), what it was, how long it took."""
    table = Table(title="timeline", title_justify="left")
    table.add_column("t (ms)", justify="right")
    table.add_column("what")
    table.add_column("took (ms)", justify="right")
    table.add_column("detail", overflow="fold")
    start = min(line.get("at", 0.0) for line in lines)
    for line in lines:
        offset = f"{(line.get('at', start) - start) * 1000:.1f}"
        match line:
            case {"event": "step"}:
                what = f"step {line.get('step')} (seed {line.get('seed')})"
                table.add_row(offset, what, f"{line.get('ms', 0):.1f}", str(line.get("detail") or ""))
            case {"event": "status"}:
                table.add_row(offset, f"status → {line.get('value')}", "", str(line.get("description") or ""))
            case _:
                if (text := progress_text(line)) is not None:
                    table.add_row(offset, str(line.get("event")), "", text.strip())
    return table


def history_table(history: list[dict[str, Any]]) -> Table:
    """A stub's status history (shown when a deploy found the stub already live: no steps to show)."""
    table = Table(title="status history", title_justify="left")
    table.add_column("t (ms)", justify="right")
    table.add_column("status")
    table.add_column("description")
    start = history[0].get("at", 0.0)
    for event in history:
        table.add_row(f"{(event.get('at', start) - start) * 1000:.1f}", event.get("value"), event.get("description"))
    return table


def stub_table(stubs: list[dict[str, Any]]) -> Table:
    """``stub list``: domain, stub URL, status (coloured), since, isolation layers, restarts, and what the
    stub's cgroup accounts for (memory now and at its peak, CPU seconds, processes)."""
    table = Table()
    right = ("restarts", "memory (peak)", "cpu", "procs")
    for column in ("domain", "stub URL", "status", "since", "isolation layers", "restarts", *right[1:]):
        # The URL is what scripts and people copy: it stays whole, the layers fold instead.
        whole = column in ("domain", "stub URL", "status")
        table.add_column(column, justify="right" if column in right else "left", overflow="fold", no_wrap=whole)
    now = time.time()
    for stub in stubs:
        isolation = stub.get("isolation") or {}
        layers = ", ".join(active_layers(isolation)) or "-"
        if isolation.get("missing"):
            layers += f" (missing {len(isolation['missing'])})"
        status = str(stub.get("status"))
        table.add_row(
            Text(str(stub.get("domain"))),
            Text(str(stub.get("url"))),
            Text(status, style=_STATUS_COLOURS.get(status, "")),
            ago(now - float(stub.get("since") or now)),
            Text(layers),
            str(stub.get("restarts", 0)),
            *usage_cells(stub.get("usage")),
        )
    if not stubs:
        table.caption = "no stubs loaded"
    return table


def usage_cells(usage: dict[str, Any] | None) -> tuple[str, str, str]:
    """A stub's cgroup accounting as three cells: ``12.3 MiB (40.1 MiB)``, ``0.42 s``, ``3`` (``-``: none)."""
    if not usage:
        return "-", "-", "-"

    def mib(value: Any) -> str:
        return "?" if value is None else f"{value / (1 << 20):.1f} MiB"

    cpu = usage.get("cpu_seconds")
    processes = usage.get("processes")
    return (
        f"{mib(usage.get('memory_bytes'))} ({mib(usage.get('memory_peak_bytes'))})",
        "?" if cpu is None else f"{cpu:.2f} s",
        "?" if processes is None else str(processes),
    )


def ago(seconds: float) -> str:
    """``3 s ago``, ``2 min ago``, ...: coarse on purpose, a table cell and not a measurement."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


class DeployView:
    """Prints deploy lines one each (with a spinner on a terminal), then the timeline and the outcome."""

    def __init__(self, out: Console, label: str) -> None:
        self.console = out
        self.label = label
        self.lines: list[Line] = []
        self.result: Line | None = None
        self._status: Status | None = None

    @contextlib.contextmanager
    def spinner(self) -> Iterator[None]:
        """Show the step in progress while the stream lasts (only on a terminal: logs get plain lines)."""
        if not self.console.is_terminal:
            yield
            return
        with self.console.status(f"{self.label}: {STEPS[0]}…") as status:
            self._status = status
            try:
                yield
            finally:
                self._status = None

    def show(self, line: Line) -> None:
        match line:
            case {"event": "result"}:
                self.result = line
            case _:
                self._progress(line)

    def _progress(self, line: Line) -> None:
        if not self.lines:
            self.console.print(f"deploying {self.label}", markup=False, soft_wrap=True)
        self.lines.append(line)
        if (text := progress_text(line)) is not None:
            self.console.print(text, markup=False, soft_wrap=True)
        match line:
            case {"event": "step", "step": str(step)} if step in STEPS and self._status is not None:
                following = STEPS.index(step) + 1
                if following < len(STEPS):
                    self._status.update(f"{self.label}: {STEPS[following]}…")
            case _:
                pass

    def finish(self) -> bool:
        """Print the timeline and the outcome; True when the stub is live."""
        result = self.result
        if result is None:
            _error(f"the runtime ended the stream without an outcome for {self.label}")
            return False
        if self.lines:
            self.console.print(timeline(self.lines))
        elif result.get("history"):
            self.console.print(history_table(result["history"]))
        if not result.get("ok"):
            hint = f"; 'protofly stub retry {result.get('domain')}' tries again" if result.get("url") else ""
            _error(
                f"deployment of {result.get('domain')} failed ({result.get('code')}): {result.get('description')}{hint}"
            )
            return False
        already = "" if self.lines else "already "
        layers = ", ".join(active_layers(result.get("isolation") or {})) or "none"
        self.console.print(
            f"{result['domain']} is {already}{result['status']} at {result['url']} "
            f"(deploy {result.get('total_ms', 0):.1f} ms; isolation: {layers})",
            markup=False,
            soft_wrap=True,
        )
        return True


def _error(text: str) -> None:
    """One line on stderr, unwrapped: scripts match on it (the commands' own errors look the same)."""
    print(f"error: {text}", file=sys.stderr, flush=True)
