"""End-to-end figures: hyperty A → stub (process sandbox) → message node → stub (process sandbox) → hyperty B.

Topology (the peer's: one node, two stubs): one message node for ``b.test`` in its own process; two runtimes
of ``b.test`` in this process, each with its home stub (``stubs/msgnode``, signed, served by a catalogue
server on 127.0.0.1 and deployed in a process sandbox) connected to that node; hyperty A in runtime A,
hyperty B in runtime B.  Four OS processes on the machine: this one, two stub hosts, the node.

* ``roundtrip_ms_p50/p99``: ``hyperty_a.request`` → hyperty B's handler answers → the response back at A;
  1,000 sequential round trips after 100 unmeasured;
* ``oneway_msgs_per_s_100b/_10kb``: hyperty A posts 10,000 ``update`` messages without waiting for
  answers; time from the first post to the last receipt at hyperty B's handler, which checks order and
  content of every message; after a warm-up of 3,000 (100 B) or 2,000 (10 kB) messages, checked the same
  way.  A keeps at most ``WINDOW_BYTES`` (4 MiB) of bodies in flight, as ``bench/msgnode.py`` does: the
  runtime drops messages to a stub whose channel holds 16 MiB unread (``dropped_to_stub``), so an unpaced
  burst of 100 MB measures that limit, not the pipeline.  ``*_errors`` counts error
  responses A got (overflow, routing) and ``*_bad`` messages out of order or altered at B;
* ``fanout_1000_ms``: runtime B has 1,000 subscribers of one resource (``<object>/changes``; each a local
  bus listener, each subscribed at the node with its own ``source``); hyperty A's runtime publishes an update
  to the resource; the time until all 1,000 listeners got it, median of 20 updates sent one at a time;
  ``fanout_1000_lost``: (20 + 200) x 1,000 deliveries expected minus those seen, the burst included;
  ``fanout_burst_deliveries_per_s``: 200 updates posted at once, deliveries per second at the listeners.

``cpu_us_per_msg_100b`` / ``_10kb``: CPU time (``/proc/<pid>/stat``) per message of the measured one-way
run, split by process: ``runtimes`` (this process: both runtimes, buses, hyperties, sandbox channels),
``stubs`` (both stub hosts together), ``node``.  That is where the time goes.

``--js``: the same topology with reTHINK's own JavaScript stub (``default.ps.js`` from dev-protostubs,
vendored under ``tests/conformance/data``, unmodified, in a Node sandbox host) as runtime A's stub, and
protofly's Python stub on runtime B's side: round trip and one-way figures (no fan-out), plus
``cold_deploy_js_ms_p50/p95``: ``load_stub`` of the JavaScript stub in a new runtime (empty state
directory, its pre-started Node host ready) until ``live``, 25 rounds after 2 unmeasured, with its steps.

``--acks=delayed`` (default) / ``immediate`` / ``off``: the acknowledged-delivery extension as shipped
(acks ride with data or wait ``ackDelay``), with every ack sent at once (stub ``ackDelay: 0``, node
``--ack-delay 0``: the behaviour before delayed acks), or not negotiated (stub ``ack: false``).

Prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from protofly.catalogue import SigningKey, TrustStore, publish  # noqa: E402
from protofly.catalogue.server import CatalogueServer  # noqa: E402
from protofly.config import RuntimeConfig  # noqa: E402
from protofly.message import Message, response_code  # noqa: E402
from protofly.msgnode.process import NodeProcess  # noqa: E402
from protofly.runtime import Runtime  # noqa: E402
from protofly.sandbox import active_layers  # noqa: E402

DOMAIN = "b.test"
STUB_PACKAGE = ROOT / "stubs" / "msgnode"
RETHINK = ROOT / "tests" / "conformance" / "data"
COLD_ROUNDS = 25
ROUNDTRIP_WARMUP = 100
ROUNDTRIPS = 1_000
ONEWAY = 10_000
WINDOW_BYTES = 4 << 20
FANOUT = 1_000
FANOUT_UPDATES = 20
FANOUT_BURST = 200
TIMEOUT = 60.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wakeups(pid: int | str) -> int:
    """Voluntary context switches of ``pid``'s main thread: how often it slept waiting for something."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def stub_hosts() -> list[int]:
    """This benchmark's stub host processes (below it through bwrap, seen here by their host pids)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_host = b"protofly.sandbox.host" in argv or any(arg.endswith(b"node_host.js") for arg in argv)
        if not is_host or b"bwrap" in argv[0]:
            continue
        ancestor = int(entry.name)
        for _ in range(6):
            ancestor = parent_of(ancestor)
            if ancestor in (0, 1, me):
                break
        if ancestor == me:
            pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU seconds used by this process, the stub hosts and the node between start() and stop()."""

    def __init__(self, node_pid: int) -> None:
        self.groups = {"runtimes": ["self"], "stubs": stub_hosts(), "node": [node_pid]}
        self.before: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self.before = self._sample()

    def per_message(self, count: int) -> dict[str, float]:
        after = self._sample()
        return {name: round((after[name] - self.before[name]) / count * 1e6, 1) for name in after}

    def wakeups(self) -> dict[str, int]:
        return {name: sum(wakeups(pid) for pid in pids) for name, pids in self.groups.items()}


async def rethink_catalogue(root: Path, node_url: str, key: SigningKey) -> CatalogueServer:
    """Publish reTHINK's JavaScript stub for b.test (signed by b.test, its descriptor pointed at the node)."""
    package = root / "package-js"
    package.mkdir()
    (package / "default.ps.js").write_bytes((RETHINK / "default.ps.js").read_bytes())
    template = json.loads((RETHINK / "default.ps.json").read_text())
    template["configuration"]["url"] = node_url
    template.update({"version": "1.0.0", "sourceFile": "default.ps.js", "egress": [node_url]})
    (package / "descriptor.json").write_text(json.dumps(template))
    publish(package, root / "published-js", key, DOMAIN)
    server = CatalogueServer(root / "published-js", default="default")
    await server.start()
    return server


async def cold_deploys_js(root: Path, server: CatalogueServer, trust_file: Path) -> dict[str, float]:
    """Cold deploys of the JavaScript stub: a new runtime each, its pre-started host ready."""
    totals: list[float] = []
    steps: dict[str, list[float]] = {}
    for index in range(-2, COLD_ROUNDS):
        async with Runtime(config(root, f"cold-{index}", server, trust_file)) as runtime:
            await runtime.sandbox.wait_ready(javascript=True)  # type: ignore[attr-defined]
            started = time.perf_counter()
            handle = await runtime.load_stub(DOMAIN)
            total = (time.perf_counter() - started) * 1000
        if index >= 0:
            totals.append(total)
            for step in handle.steps:
                steps.setdefault(step.name, []).append(step.ms)
    figures = {
        "cold_deploy_js_ms_p50": round(statistics.median(totals), 2),
        "cold_deploy_js_ms_p95": round(percentile(totals, 0.95), 2),
    }
    for name, values in steps.items():
        figures[f"cold_deploy_js_step_{name}_ms_p50"] = round(statistics.median(values), 3)
    return figures


#: ``--acks``: the stub's configuration and the node's options for each variant.
ACKS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "delayed": ({}, ()),
    "immediate": ({"ackDelay": 0}, ("--ack-delay", "0")),
    "off": ({"ack": False}, ()),
}
ACK_MODE = "delayed"


async def catalogue(root: Path, node_url: str) -> tuple[CatalogueServer, Path]:
    """Publish the stub for b.test (signed, configured with the node's URL) and serve it."""
    key = SigningKey.generate(DOMAIN)
    trust = TrustStore()
    trust.add(DOMAIN, key.public_raw)
    trust_file = root / "trust.json"
    trust.save(trust_file)
    package = root / "package"
    shutil.copytree(STUB_PACKAGE, package)
    template = json.loads((package / "descriptor.json").read_text())
    template["configuration"]["url"] = node_url
    template["configuration"].update(ACKS[ACK_MODE][0])
    template["egress"] = [node_url]  # the only endpoint the stub may reach, opened for it by the runtime
    (package / "descriptor.json").write_text(json.dumps(template))
    publish(package, root / "published", key, DOMAIN)
    server = CatalogueServer(root / "published", default="default")
    await server.start()
    KEYS[DOMAIN] = key
    return server, trust_file


#: The signing key of each domain published by :func:`catalogue` (the JavaScript variant signs with it too).
KEYS: dict[str, SigningKey] = {}


def config(root: Path, name: str, server: CatalogueServer, trust_file: Path) -> RuntimeConfig:
    return RuntimeConfig(
        domain=DOMAIN,
        state_dir=root / name,
        catalogues={DOMAIN: server.base_url},
        trust_store=trust_file,
        allow_http_loopback=True,
        deploy_timeout=30.0,
        request_timeout=30.0,
    )


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Receiver:
    """Hyperty B's handler for one-way runs: checks order and content, notes the last receipt."""

    def __init__(self) -> None:
        self.expected: list[dict[str, Any]] = []
        self.count = 0
        self.bad = 0
        self.last = 0.0
        self.done = asyncio.Event()
        self.progress = asyncio.Event()

    def reset(self, bodies: list[dict[str, Any]]) -> None:
        self.expected = bodies
        self.count = 0
        self.bad = 0
        self.done = asyncio.Event()

    def __call__(self, msg: Message) -> Any:
        if msg.type == "execute":
            return {"seq": msg.body["seq"]}  # the round trip: answered with 200
        want = self.expected[self.count] if self.count < len(self.expected) else None
        body = msg.body
        if want is None or body.get("seq") != want["seq"] or body.get("pad") != want["pad"]:
            self.bad += 1
        self.count += 1
        self.progress.set()
        if self.count == len(self.expected):
            self.last = time.perf_counter()
            self.done.set()
        return None


async def roundtrips(hyperty_a, target: str, meter: CpuMeter) -> dict[str, Any]:
    for seq in range(ROUNDTRIP_WARMUP):
        await hyperty_a.request(target, "execute", {"seq": seq}, timeout=TIMEOUT)
    samples = []
    meter.start()
    woken = meter.wakeups()
    for seq in range(ROUNDTRIPS):
        started = time.perf_counter()
        answer = await hyperty_a.request(target, "execute", {"seq": seq}, timeout=TIMEOUT)
        samples.append((time.perf_counter() - started) * 1000)
        if response_code(answer) != 200 or answer.body["value"]["seq"] != seq:
            raise RuntimeError(f"round trip {seq} failed: {answer.body}")
    after = meter.wakeups()
    return {
        "roundtrip_ms_p50": round(statistics.median(samples), 3),
        "roundtrip_ms_p99": round(percentile(samples, 0.99), 3),
        "roundtrip_cpu_us": meter.per_message(ROUNDTRIPS),
        "roundtrip_wakeups": {name: round((after[name] - woken[name]) / ROUNDTRIPS, 2) for name in after},
    }


async def one_way(
    hyperty_a, target: str, receiver: Receiver, errors: list, size: int, count: int, window: int | None = None
) -> tuple[float, int]:
    """Post ``count`` messages of about ``size`` bytes of body; return (msgs/s, bad) once B has them all.

    ``window``: messages in flight at most (default: ``WINDOW_BYTES`` of bodies).
    """
    bodies = [{"seq": seq, "pad": "x" * max(size - 20, 0)} for seq in range(count)]
    receiver.reset(bodies)
    before = len(errors)
    if window is None:
        window = max(WINDOW_BYTES // max(size, 1), 1)
    started = time.perf_counter()
    for sent, body in enumerate(bodies):
        while sent - receiver.count >= window:
            receiver.progress.clear()
            await asyncio.wait_for(receiver.progress.wait(), TIMEOUT)
        hyperty_a.post(target, "update", body)
    await asyncio.wait_for(receiver.done.wait(), TIMEOUT)
    elapsed = receiver.last - started
    if len(errors) > before:
        raise RuntimeError(f"{len(errors) - before} error responses, first: {errors[before].body}")
    return count / elapsed, receiver.bad


async def fan_out(rt_a: Runtime, rt_b: Runtime) -> dict[str, float | int]:
    """1,000 subscribers in runtime B; updates published from runtime A; deliveries counted per update."""
    node = f"domain://msg-node.{DOMAIN}"
    allocated = await rt_a.bus.request(
        Message(
            type="create",
            from_=f"{rt_a.runtime_url}/address-allocation",
            to=f"{node}/address-allocation",
            body={"scheme": "comm", "value": {"number": 1}},
        ),
        TIMEOUT,
    )
    obj = allocated.body["value"]["allocated"][0]
    resource = f"{obj}/changes"
    seen: list[int] = [0] * (FANOUT_UPDATES + FANOUT_BURST)
    state = {"target": 0, "time": 0.0, "wanted": FANOUT}
    reached = asyncio.Event()

    def listener(msg: Message) -> None:
        update = msg.body["update"]
        seen[update] += 1
        if update == state["target"] and seen[update] == state["wanted"]:
            state["time"] = time.perf_counter()
            reached.set()

    answers = await asyncio.gather(
        *(
            rt_b.bus.request(
                Message(
                    type="subscribe",
                    from_=f"{rt_b.runtime_url}/sm",
                    to=f"{node}/sm",
                    body={"resources": [resource], "source": f"{rt_b.runtime_url}/subscriber/{i}"},
                ),
                TIMEOUT,
            )
            for i in range(FANOUT)
        )
    )
    if any(response_code(a) != 200 for a in answers):
        raise RuntimeError("a subscription failed")
    for _ in range(FANOUT):
        rt_b.bus.add_listener(resource, listener)
    publisher = f"{obj}"
    samples = []
    for update in range(FANOUT_UPDATES):
        reached.clear()
        state["target"] = update
        started = time.perf_counter()
        rt_a.bus.post(Message(type="update", from_=publisher, to=resource, body={"update": update}))
        try:
            await asyncio.wait_for(reached.wait(), 10)
        except TimeoutError:
            continue  # counted as lost below
        samples.append((state["time"] - started) * 1000)
    reached.clear()
    state["target"] = FANOUT_UPDATES + FANOUT_BURST - 1
    started = time.perf_counter()
    for update in range(FANOUT_UPDATES, FANOUT_UPDATES + FANOUT_BURST):
        rt_a.bus.post(Message(type="update", from_=publisher, to=resource, body={"update": update}))
    burst_ok = True
    try:
        await asyncio.wait_for(reached.wait(), TIMEOUT)
    except TimeoutError:
        burst_ok = False
    burst_elapsed = (state["time"] if burst_ok else time.perf_counter()) - started
    await asyncio.sleep(0.2)  # late deliveries of the burst still count (none expected)
    expected = FANOUT * (FANOUT_UPDATES + FANOUT_BURST)
    return {
        "fanout_1000_ms": round(statistics.median(samples), 3) if samples else -1,
        "fanout_1000_lost": expected - sum(seen),
        "fanout_burst_deliveries_per_s": round(FANOUT * FANOUT_BURST / burst_elapsed),
    }


async def main(js: bool = False) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="protofly-bench-e2e-"))
    node = NodeProcess(DOMAIN, "--ping-interval", "0", *ACKS[ACK_MODE][1])
    server = server_a = None
    try:
        await node.start()
        server, trust_file = await catalogue(root, node.url)
        server_a = await rethink_catalogue(root, node.url, KEYS[DOMAIN]) if js else server
        async with (
            Runtime(config(root, "a", server_a, trust_file)) as rt_a,
            Runtime(config(root, "b", server, trust_file)) as rt_b,
        ):
            receiver = Receiver()
            errors: list[Message] = []
            hyperty_b = await rt_b.new_hyperty(receiver)
            hyperty_a = await rt_a.new_hyperty(lambda msg: errors.append(msg) if response_code(msg) != 200 else None)
            figures: dict[str, Any] = {}
            meter = CpuMeter(node.pid)
            figures.update(await roundtrips(hyperty_a, hyperty_b.url, meter))
            for key, size, warmup in (("100b", 100, 3_000), ("10kb", 10_000, 2_000)):
                await one_way(hyperty_a, hyperty_b.url, receiver, errors, size, warmup)
                meter.start()
                rate, bad = await one_way(hyperty_a, hyperty_b.url, receiver, errors, size, ONEWAY)
                figures[f"cpu_us_per_msg_{key}"] = meter.per_message(ONEWAY)
                figures[f"oneway_msgs_per_s_{key}"] = round(rate)
                figures[f"oneway_{key}_bad"] = bad
            if not js:
                figures.update(await fan_out(rt_a, rt_b))
            record = rt_a.registry.stub(DOMAIN)
            figures["stub_a_host"] = record.isolation.get("host", "python")
            figures["stub_isolation"] = "+".join(active_layers(record.isolation))
            figures["stub_isolation_missing"] = len(record.isolation.get("missing", []))
            figures["acks"] = ACK_MODE
        if js:
            figures.update(await cold_deploys_js(root, server_a, trust_file))
        return figures
    finally:
        if server_a is not None and server_a is not server:
            await server_a.stop()
        if server is not None:
            await server.stop()
        await node.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg.startswith("--acks="):
            ACK_MODE = arg.removeprefix("--acks=")
            if ACK_MODE not in ACKS:
                sys.exit(f"--acks: expected one of {', '.join(ACKS)}, got {ACK_MODE!r}")
    print(json.dumps(asyncio.run(main(js="--js" in sys.argv[1:]))))
