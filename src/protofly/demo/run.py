"""``protofly demo``: protocol stubs deployed on the fly between two local domains, shown step by step.

What happens (every line of output is one event; ``--json`` prints them as JSON lines):

1. domains ``a.test`` and ``b.test`` start on 127.0.0.1, each with a catalogue serving a freshly signed
   message node stub and a message node;
2. runtime B creates hyperty *bob*; runtime A creates hyperty *alice* (each runtime deploys its home stub);
3. alice sends bob a request: runtime A has no stub for ``b.test``, so it deploys one on the fly (the
   seed's steps, timed), and the request and bob's reply travel through both domains' stubs and nodes;
4. ``b.test``'s message node restarts: the stubs report ``disconnected``, reconnect, and are ``live``
   again; alice's next request gets through;
5. everything started is stopped; no process is left behind.

With ``--console``, runtime A's web console (:mod:`protofly.observe`) is served on 127.0.0.1 from the start,
so the deploys are seen as they happen; after step 4 it stays open until Ctrl-C (SIGINT/SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from protofly.demo.world import LocalDomains
from protofly.events import RuntimeEvent, StatusChanged, as_json
from protofly.message import Message, response_code
from protofly.runtime import Runtime
from protofly.sandbox import active_layers

if TYPE_CHECKING:
    from rich.table import Table

Emit = Callable[[dict[str, Any]], None]

STEP_TIMEOUT = 10.0


async def run_demo(emit: Emit, *, console: bool = False) -> None:
    """Run the whole story, reporting each event through ``emit`` (``console``: serve A's console, wait)."""
    started = time.perf_counter()

    def say(event: str, **fields: Any) -> None:
        emit({"t": round(time.perf_counter() - started, 4), "event": event, **fields})

    async with LocalDomains("a.test", "b.test") as world:
        for name, domain in world.domains.items():
            say("domain", domain=name, catalogue=domain.catalogue.base_url, node=domain.node_url)
        async with Runtime(world.config("a.test")) as a, Runtime(world.config("b.test")) as b:
            for label, runtime in (("A", a), ("B", b)):
                _watch(runtime, label, say)
                say("runtime", runtime=label, runtime_url=runtime.runtime_url)
            async with _console(a, say) if console else contextlib.nullcontext():
                await _story(world, a, b, say)
    say("done", seconds=round(time.perf_counter() - started, 3))


async def _story(world: LocalDomains, a: Runtime, b: Runtime, say: Callable[..., None]) -> None:
    """Steps 2-4: hyperties, a request that deploys b.test's stub on the fly, a node restart under it."""

    def serve(msg: Message) -> dict[str, Any]:
        say("delivered", at=bob.url, sender=msg.from_, body=msg.body)
        return {"pong": (msg.body or {}).get("params")}

    bob = await b.new_hyperty(serve)
    say("hyperty", runtime="B", url=bob.url)
    alice = await a.new_hyperty()
    say("hyperty", runtime="A", url=alice.url)

    await _ping(alice, bob.url, 1, say)
    stub = a.registry.stub("b.test")
    if stub is not None:
        say("stub", runtime="A", **stub.summary())

    node = world["b.test"]
    say("node-stopping", domain="b.test")
    await node.stop_node()
    await a.registry.wait_for_status("b.test", ["disconnected", "failed"], STEP_TIMEOUT)
    await node.start_node()
    say("node-started", domain="b.test", node=node.node_url)
    await a.registry.wait_for_status("b.test", ["live"], STEP_TIMEOUT)
    await b.registry.wait_for_status("b.test", ["live"], STEP_TIMEOUT)
    await _ping(alice, bob.url, 2, say)


@contextlib.asynccontextmanager
async def _console(runtime: Runtime, say: Callable[..., None]) -> AsyncIterator[None]:
    """Runtime A's console for the whole story; after it, wait for SIGINT/SIGTERM before stopping."""
    from protofly.observe.server import ObserveServer

    observe = ObserveServer(runtime, console="127.0.0.1:0")
    await observe.start()
    try:
        say("console", runtime="A", url=observe.urls["console"] + "/")
        yield
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        say("console-open", url=observe.urls["console"] + "/", until="Ctrl-C")
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await observe.close()


async def _ping(alice: Any, to: str, n: int, say: Callable[..., None]) -> None:
    body = {"method": "ping", "params": [n]}
    say("request", sender=alice.url, to=to, body=body)
    sent = time.perf_counter()
    reply = await alice.request(to, "execute", body, timeout=STEP_TIMEOUT)
    code = response_code(reply)
    say("reply", to=alice.url, code=code, body=reply.body, ms=round((time.perf_counter() - sent) * 1000, 3))
    if code != 200:
        raise RuntimeError(f"request {n} failed: {reply.body}")


def _watch(runtime: Runtime, label: str, say: Callable[..., None]) -> None:
    """Report the runtime's deploy steps, supervision decisions and every stub status it records."""

    def on_event(event: RuntimeEvent) -> None:
        match event:
            case StatusChanged(domain=domain, value=value, description=description):
                say("status", runtime=label, stub=domain, value=value, description=description)
            case _:
                fields = as_json(event)
                say(fields.pop("event"), runtime=label, **fields)

    runtime.events.subscribe(on_event)


# -- presentation ------------------------------------------------------------------------------------


def json_lines() -> Emit:
    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    return emit


def rich_lines() -> tuple[Emit, Callable[[], None]]:
    """A rich rendering: one line per event, and the deploy timeline of b.test's stub in runtime A."""
    from rich.console import Console

    out = Console(highlight=False)
    steps: list[dict[str, Any]] = []
    colours = {"live": "green", "disconnected": "yellow", "failed": "red", "deployment-failed": "red"}

    def emit(event: dict[str, Any]) -> None:
        t = f"[dim]{event['t']:7.3f}s[/]"
        match event:
            case {"event": "domain", "domain": domain, "catalogue": catalogue, "node": node}:
                out.print(f"{t} [bold]{domain}[/]: catalogue {catalogue}, message node {node}")
            case {"event": "runtime", "runtime": label, "runtime_url": url}:
                out.print(f"{t} runtime {label} is {url}")
            case {"event": "step", "runtime": label, "domain": domain}:
                if label == "A" and domain == "b.test":
                    steps.append(event)
                out.print(
                    f"{t} runtime {label} deploying [bold]{domain}[/]: step {event['step']} "
                    f"(seed {event['seed']}) {event['ms']:.2f} ms  [dim]{event.get('detail') or ''}[/]"
                )
            case {"event": "status", "runtime": label, "stub": stub, "value": value}:
                colour = colours.get(str(value), "cyan")
                why = f"  [dim]{event['description']}[/]" if event.get("description") else ""
                out.print(f"{t} runtime {label}: stub {stub} is [{colour}]{value}[/]{why}")
            case {"event": "hyperty", "runtime": label, "url": url}:
                out.print(f"{t} runtime {label} created hyperty {url}")
            case {"event": "request", "sender": sender, "to": to, "body": body}:
                out.print(f"{t} [bold]request[/] {sender} → {to}: {body}")
            case {"event": "delivered", "at": at}:
                out.print(f"{t} delivered to {at}")
            case {"event": "reply", "code": code, "ms": ms, "body": body}:
                out.print(f"{t} [bold]reply[/] {code} in {ms} ms: {body.get('value')}")
            case {"event": "stub", "isolation": isolation, "url": url}:
                out.print(f"{t} runtime A's stub for b.test: {url} isolation {'+'.join(active_layers(isolation))}")
                if steps:
                    out.print(_timeline_table(steps))
            case {"event": "node-stopping" | "node-started" as kind, "domain": domain}:
                out.print(f"{t} [bold magenta]{kind}[/] {domain}")
            case {"event": "console", "url": url}:
                out.print(f"{t} [bold]console[/] of runtime A: {url} (127.0.0.1 only, read-only)")
            case {"event": "console-open", "url": url}:
                out.print(f"{t} the story is over; the console stays open at {url} until Ctrl-C")
            case {"event": "done", "seconds": seconds}:
                out.print(f"{t} [bold green]done[/] in {seconds} s; everything started has stopped")
            case _:
                details = {k: v for k, v in event.items() if k not in ("event", "t")}
                out.print(f"{t} {event.get('event')} {details}")

    return emit, lambda: None


def _timeline_table(steps: list[dict[str, Any]]) -> Table:
    """The deploy of b.test's stub in runtime A, one row per step, with the total."""
    from rich.table import Table

    table = Table(title="deploy of b.test's stub in runtime A")
    for column in ("step", "seed steps", "ms", "detail"):
        table.add_column(column)
    for step in steps:
        table.add_row(step["step"], step["seed"], f"{step['ms']:.2f}", str(step.get("detail") or ""))
    table.add_row("total", "1-12", f"{sum(s['ms'] for s in steps):.2f}", "")
    return table


def main(as_json: bool = False, *, console: bool = False) -> int:
    emit = json_lines() if as_json else rich_lines()[0]
    try:
        asyncio.run(run_demo(emit, console=console))
    except Exception as exc:
        emit({"t": 0, "event": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0
