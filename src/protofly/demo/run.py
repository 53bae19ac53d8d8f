"""``protofly demo``: protocol stubs deployed on the fly between two local domains, shown step by step.

What happens (every line of output is one event; ``--json`` prints them as JSON lines):

1. domains ``a.test`` and ``b.test`` start on 127.0.0.1, each with a catalogue serving a freshly signed
   message node stub and a message node;
2. runtime B creates hyperty *bob*; runtime A creates hyperty *alice* (each runtime deploys its home stub);
3. alice sends bob a request: runtime A has no stub for ``b.test``, so it deploys one on the fly (the
   seed's steps, timed), and the request and bob's reply travel through both domains' stubs and nodes;
4. ``b.test``'s message node restarts: the stubs report ``disconnected``, reconnect, and are ``live``
   again; alice's next request gets through;
5. when Prosody and Mosquitto are installed (else the demo says how to install them), two more domains
   whose back-ends nobody here wrote: alice sends a chat line to ``xmpp://bob@chat.test``, a plain XMPP
   user who answers, and subscribes to ``mqtt://iot.test/sensors/#``, where a plain MQTT client publishes
   readings; runtime A deploys the XMPP and the MQTT stub on the fly (``docs/protocols.md``), so its deploy
   timeline shows three different stubs;
6. everything started is stopped; no process is left behind.

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

import msgspec

from protofly.demo.backends import INSTALL_HINT, missing_servers
from protofly.demo.world import LocalDomains, stubs_dir
from protofly.events import RuntimeEvent, StatusChanged, as_json
from protofly.message import Message, response_code
from protofly.runtime import Runtime
from protofly.sandbox import active_layers

if TYPE_CHECKING:
    from rich.table import Table

    from protofly.demo.interworking import Interworking

Emit = Callable[[dict[str, Any]], None]

STEP_TIMEOUT = 10.0


async def run_demo(emit: Emit, *, console: bool = False) -> None:
    """Run the whole story, reporting each event through ``emit`` (``console``: serve A's console, wait)."""
    started = time.perf_counter()

    def say(event: str, **fields: Any) -> None:
        emit({"t": round(time.perf_counter() - started, 4), "event": event, **fields})

    async with LocalDomains("a.test", "b.test") as world, _interworking(world, say) as extra:
        for name, domain in world.domains.items():
            say("domain", domain=name, catalogue=domain.catalogue.base_url, node=domain.node_url)
        config_a = world.config("a.test")
        if extra is not None:
            config_a = msgspec.structs.replace(
                config_a,
                catalogues={**config_a.catalogues, **extra.catalogue_urls()},
                credentials_file=extra.credentials_file,
            )
        async with Runtime(config_a) as a, Runtime(world.config("b.test")) as b:
            for label, runtime in (("A", a), ("B", b)):
                _watch(runtime, label, say)
                say("runtime", runtime=label, runtime_url=runtime.runtime_url)
            async with _console(a, say) if console else contextlib.nullcontext():
                alice = await _story(world, a, b, say)
                if extra is not None:
                    await _chat_and_sensors(alice, extra, say)
    say("done", seconds=round(time.perf_counter() - started, 3))


async def _story(world: LocalDomains, a: Runtime, b: Runtime, say: Callable[..., None]) -> Any:
    """Steps 2-4: hyperties, a request that deploys b.test's stub on the fly, a node restart under it; alice."""

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
    return alice


@contextlib.asynccontextmanager
async def _interworking(world: LocalDomains, say: Callable[..., None]) -> AsyncIterator[Interworking | None]:
    """Prosody and Mosquitto with their catalogues when the servers and clients are installed, else None (said)."""
    missing = missing_servers()
    try:
        from protofly.demo.interworking import Interworking
    except ImportError as exc:
        say("interworking-skipped", missing=[exc.name], hint="pip install 'protofly[protocols]'")
        yield None
        return
    if missing:
        say("interworking-skipped", missing=missing, hint=INSTALL_HINT)
        yield None
        return
    async with Interworking(world.root / "interworking", world.trust, stubs_dir()) as extra:
        world.trust.save(world.trust_file)
        for domain, url in extra.catalogue_urls().items():
            say("domain", domain=domain, catalogue=url, node=None)
        say("backends", prosody=extra.prosody.endpoint, mosquitto=extra.mosquitto.endpoint, pids=extra.server_pids())
        yield extra


async def _chat_and_sensors(alice: Any, extra: Interworking, say: Callable[..., None]) -> None:
    """alice chats with a plain XMPP user and reads a plain MQTT sensor; both stubs deploy on the fly."""
    inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=100)
    alice.on_message(lambda msg: None if inbox.full() else inbox.put_nowait(msg))
    bob = extra.bob()
    await bob.start()
    try:
        to = "xmpp://bob@chat.test"
        body = {"value": {"text": "hello bob, this is a reTHINK hyperty"}}
        say("chat-send", sender=alice.url, to=to, body=body)
        sent = time.perf_counter()
        reply = await alice.request(to, "create", body, timeout=STEP_TIMEOUT)
        say("chat-accepted", code=response_code(reply), ms=round((time.perf_counter() - sent) * 1000, 3))
        if response_code(reply) != 200:
            raise RuntimeError(f"the chat line was refused: {reply.body}")
        heard = await asyncio.wait_for(bob.heard.get(), STEP_TIMEOUT)
        say("chat-heard", by="bob@chat.test (plain XMPP client)", sender=heard[0], text=heard[1])
        answer = await asyncio.wait_for(inbox.get(), STEP_TIMEOUT)
        say("chat-answer", to=alice.url, sender=answer.from_, text=(answer.body or {}).get("value", {}).get("text"))
    finally:
        await bob.stop()

    topic = "mqtt://iot.test/sensors/#"
    reply = await alice.request(topic, "subscribe", timeout=STEP_TIMEOUT)
    say("subscribed", sender=alice.url, to=topic, code=response_code(reply))
    if response_code(reply) != 200:
        raise RuntimeError(f"the subscription was refused: {reply.body}")
    readings = [("sensors/kitchen/temperature", 21.5), ("sensors/kitchen/humidity", 48), ("sensors/hall/door", "open")]
    async with extra.sensor() as sensor:
        for mqtt_topic, value in readings:
            await sensor.publish(mqtt_topic, json.dumps(value), qos=1)
            say("sensor-published", by="sensor (plain MQTT client)", topic=mqtt_topic, value=value)
    for _ in readings:
        update = await asyncio.wait_for(inbox.get(), STEP_TIMEOUT)
        say("sensor-update", to=alice.url, sender=update.from_, value=(update.body or {}).get("value"))


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
                if label == "A" and domain != "a.test":
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
                    out.print(
                        _timeline_table(
                            [s for s in steps if s["domain"] == "b.test"], "deploy of b.test's stub in runtime A"
                        )
                    )
            case {"event": "interworking-skipped", "missing": missing, "hint": hint}:
                out.print(
                    f"{t} [yellow]chat.test and iot.test skipped[/]: {', '.join(map(str, missing))} missing ({hint})"
                )
            case {"event": "backends", "prosody": prosody, "mosquitto": mosquitto}:
                out.print(f"{t} Prosody (chat.test) at {prosody}, Mosquitto (iot.test) at {mosquitto}")
            case {"event": "chat-send", "to": to, "body": body}:
                out.print(f"{t} [bold]chat[/] alice → {to}: {body['value']['text']!r}")
            case {"event": "chat-heard", "by": by, "text": text}:
                out.print(f"{t} {by} got {text!r}")
            case {"event": "chat-answer", "sender": sender, "text": text}:
                out.print(f"{t} [bold]chat[/] alice ← {sender}: {text!r}")
            case {"event": "sensor-published", "topic": topic, "value": value}:
                out.print(f"{t} plain MQTT sensor published {topic} = {value!r}")
            case {"event": "sensor-update", "sender": sender, "value": value}:
                out.print(f"{t} [bold]update[/] alice ← {sender}: {value!r}")
            case {"event": "node-stopping" | "node-started" as kind, "domain": domain}:
                out.print(f"{t} [bold magenta]{kind}[/] {domain}")
            case {"event": "console", "url": url}:
                out.print(f"{t} [bold]console[/] of runtime A: {url} (127.0.0.1 only, read-only)")
            case {"event": "console-open", "url": url}:
                out.print(f"{t} the story is over; the console stays open at {url} until Ctrl-C")
            case {"event": "done", "seconds": seconds}:
                if len({s["domain"] for s in steps}) > 1:
                    out.print(_timeline_table(steps, "runtime A: stubs deployed on the fly"))
                out.print(f"{t} [bold green]done[/] in {seconds} s; everything started has stopped")
            case _:
                details = {k: v for k, v in event.items() if k not in ("event", "t")}
                out.print(f"{t} {event.get('event')} {details}")

    return emit, lambda: None


def _timeline_table(steps: list[dict[str, Any]], what: str) -> Table:
    """Deploys in runtime A, one row per step, with a total per domain."""
    from rich.table import Table

    table = Table(title=what)
    for column in ("domain", "step", "seed steps", "ms", "detail"):
        table.add_column(column)
    for domain in dict.fromkeys(s["domain"] for s in steps):
        mine = [s for s in steps if s["domain"] == domain]
        for step in mine:
            table.add_row(domain, step["step"], step["seed"], f"{step['ms']:.2f}", str(step.get("detail") or ""))
        table.add_row(domain, "total", "1-12", f"{sum(s['ms'] for s in mine):.2f}", "")
    return table


def main(as_json: bool = False, *, console: bool = False) -> int:
    emit = json_lines() if as_json else rich_lines()[0]
    try:
        asyncio.run(run_demo(emit, console=console))
    except Exception as exc:
        emit({"t": 0, "event": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0
