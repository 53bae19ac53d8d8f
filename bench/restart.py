"""Recovery after crashes, and what acknowledged delivery and durable node state cost.

Topology as ``bench/e2e.py``: one message node for ``b.test`` in its own process, two runtimes of ``b.test``
in this process, each with its home stub (signed, served by a catalogue, process sandbox); hyperty A in
runtime A sends to hyperty B in runtime B.

* ``oneway_msgs_per_s_100b``: ``ONEWAY`` (60,000) one-way messages of 100 B (after 5,000 unmeasured), for
  three set-ups: ``plain`` (stubs without the ack extension, node without state), ``ack`` (acknowledged
  delivery) and ``ack_durable`` (acknowledged delivery, node with ``--state-dir``, fsync every second).
  A measured run lasts about a second, so it holds the periodic fsyncs it pays for.  Hyperty A keeps at
  most ``WINDOW`` (5,000) messages in flight: half the node's per-session window of unacknowledged
  messages (``DEFAULT_BUFFER_MESSAGES``), beyond which the node answers ``503`` -- a bench that outruns
  it measures that limit, not the pipeline.  Reported per set-up: ``median`` and ``best`` over the rounds;
* ``ack_cost_pct`` / ``durable_cost_pct``: the throughput lost against ``plain``, in per cent, from the
  medians (``median``), from the bests (``best``) and the median of each round's own cost (``paired``:
  the set-ups of a round run back to back, so a slow change of the machine's load cancels out);
* ``cpu_us_per_msg_100b``: CPU time per measured message (``/proc/<pid>/stat``), per set-up, median over
  the rounds, split as ``bench/e2e.py`` does: ``runtimes`` (this process), ``stubs`` (both stub hosts),
  ``node``; on a shared machine this, not the rate, is the figure to compare;
* ``stub_kill_recovery_ms``: runtime A's stub process is SIGKILLed; a request is posted at once; the time
  until its reply is back (the runtime notices the death, restarts the stub, which re-opens its session
  and carries the request); median of 5;
* ``node_kill_recovery_ms``: the node process is SIGKILLed and started again on its port with its state
  directory; a request posted at the kill; the time until its reply (node start-up included); median of 3.

Each set-up runs ``--rounds`` times (default 7), interleaved: on a shared machine the load changes by a
factor of two between runs, far more than what is measured.  A round that fails (time-out, error
responses, a node that does not start) is listed under ``failed`` with its error and left out of the
figures; the JSON object is printed whatever happens (``error`` when the bench itself broke).

``python bench/restart.py [--rounds N] [--messages N] [--no-recovery] [--fsync-interval S]`` (the
durable set-up's fsync interval, 1 s by default; -1 never fsyncs: what the fsyncs cost).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from e2e import DOMAIN, STUB_PACKAGE, CpuMeter, Receiver, config, one_way, parent_of
from protofly.catalogue import SigningKey, TrustStore, publish
from protofly.catalogue.server import CatalogueServer
from protofly.message import Message, response_code
from protofly.msgnode.core import DEFAULT_BUFFER_MESSAGES
from protofly.msgnode.process import NodeProcess
from protofly.runtime import Runtime

ONEWAY = 60_000
WARMUP = 5_000
WINDOW = DEFAULT_BUFFER_MESSAGES // 2
ROUNDS = 7
#: ``--fsync-interval`` of the durable set-up (``bench/restart.py --fsync-interval``; -1: never).
FSYNC_INTERVAL = 1.0
TIMEOUT = 30.0
SETUPS = (("plain", False, False), ("ack", True, False), ("ack_durable", True, True))


def kill_tree(pid: int) -> None:
    """SIGKILL a stub's sandbox host and its children (the confined process below bwrap)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*"):
        try:
            if parent_of(int(stat.name)) == pid:
                children.append(int(stat.name))
        except (OSError, ValueError, IndexError):
            continue
    for each in [*children, pid]:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_process(state_dir: Path | None) -> NodeProcess:
    """The node in its own process, restartable on its port (with ``--state-dir`` when durable)."""
    durable = () if state_dir is None else ("--state-dir", str(state_dir), "--fsync-interval", str(FSYNC_INTERVAL))
    return NodeProcess(DOMAIN, "--ping-interval", "0", *durable)


async def catalogue(root: Path, node_url: str, ack: bool) -> tuple[CatalogueServer, Path]:
    key = SigningKey.generate(DOMAIN)
    trust = TrustStore()
    trust.add(DOMAIN, key.public_raw)
    trust_file = root / "trust.json"
    trust.save(trust_file)
    package = root / "package"
    shutil.copytree(STUB_PACKAGE, package)
    template = json.loads((package / "descriptor.json").read_text())
    template["configuration"].update(url=node_url, ack=ack, backoffBase=0.02, backoffCap=0.2)
    template["egress"] = [node_url]  # the only endpoint the stub may reach, opened for it by the runtime
    (package / "descriptor.json").write_text(json.dumps(template))
    publish(package, root / "published", key, DOMAIN)
    server = CatalogueServer(root / "published", default="default")
    await server.start()
    return server, trust_file


async def timed_request(hyperty_a: Any, target: str, started: float) -> float:
    answer = await hyperty_a.request(target, "execute", {"seq": -1}, timeout=TIMEOUT)
    if response_code(answer) != 200:
        raise RuntimeError(f"request after a kill failed: {answer.body}")
    return (time.perf_counter() - started) * 1000


async def recover(rt_a: Runtime, node: NodeProcess, hyperty_a: Any, target: str) -> dict[str, float]:
    """Recovery times: runtime A's stub SIGKILLed (5 times), then the node SIGKILLed and restarted (3 times)."""
    stub_samples = []
    for attempt in range(5):
        record = rt_a.registry.stub(DOMAIN)
        pid = record.info["pid"]
        started = time.perf_counter()
        kill_tree(pid)
        try:
            stub_samples.append(await timed_request(hyperty_a, target, started))
        except RuntimeError as exc:
            raise RuntimeError(
                f"attempt {attempt}: {exc}; {[(e.value, e.description) for e in record.history][-6:]}"
            ) from None
        await rt_a.registry.wait_for_status(record, ["live"], TIMEOUT)
    figures = {"stub_kill_recovery_ms": round(statistics.median(stub_samples), 1)}
    node_samples = []
    for _ in range(3):
        started = time.perf_counter()
        node.kill()
        await node.stop()  # reaps it: the port is free for the restart
        pending = asyncio.ensure_future(timed_request(hyperty_a, target, started))
        await node.start()
        node_samples.append(await pending)
    figures["node_kill_recovery_ms"] = round(statistics.median(node_samples), 1)
    return figures


async def setup(name: str, *, ack: bool, durable: bool, recovery: bool, messages: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"protofly-bench-restart-{name}-"))
    state_dir = root / "node" if durable else None
    if state_dir is not None:
        state_dir.mkdir()
    node = node_process(state_dir)
    server = None
    figures: dict[str, Any] = {}
    try:
        await node.start()
        server, trust_file = await catalogue(root, node.url, ack)
        async with (
            Runtime(msgspec.structs.replace(config(root, "a", server, trust_file), crash_budget=100)) as rt_a,
            Runtime(msgspec.structs.replace(config(root, "b", server, trust_file), crash_budget=100)) as rt_b,
        ):
            receiver = Receiver()
            errors: list[Message] = []
            hyperty_b = await rt_b.new_hyperty(receiver)
            hyperty_a = await rt_a.new_hyperty(lambda msg: errors.append(msg) if response_code(msg) != 200 else None)
            await one_way(hyperty_a, hyperty_b.url, receiver, errors, 100, WARMUP, WINDOW)
            assert node.proc is not None
            meter = CpuMeter(node.proc.pid)
            meter.start()
            rate, bad = await one_way(hyperty_a, hyperty_b.url, receiver, errors, 100, messages, WINDOW)
            figures["cpu_us_per_msg_100b"] = meter.per_message(messages)
            figures["oneway_msgs_per_s_100b"] = round(rate)
            figures["oneway_bad"] = bad
            if recovery:
                try:
                    figures.update(await recover(rt_a, node, hyperty_a, hyperty_b.url))
                except (RuntimeError, TimeoutError) as exc:  # the throughput stands; the recovery is retried
                    figures["recovery_failed"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if server is not None:
            await server.stop()
        await node.stop()
        shutil.rmtree(root, ignore_errors=True)
    return figures


def cost_pct(rate: float | None, plain: float | None) -> float | None:
    """Throughput lost against ``plain``, in per cent (None when a set-up has no successful round)."""
    if rate is None or not plain:
        return None
    return round(100 * (1 - rate / plain), 1)


def paired_cost_pct(per_round: list[dict[str, int]], name: str) -> float | None:
    """Median over the rounds of ``name``'s cost against ``plain`` in the same round: a slow drift of the
    machine's load moves both rates of a round alike and cancels out."""
    costs = [cost_pct(rates[name], rates["plain"]) for rates in per_round if name in rates and "plain" in rates]
    values = [cost for cost in costs if cost is not None]
    return round(statistics.median(values), 1) if values else None


async def main(rounds: int = ROUNDS, messages: int = ONEWAY, recovery: bool = True) -> dict[str, Any]:
    """Each set-up ``rounds`` times, interleaved (the machine's load changes); median and best of each."""
    rates: dict[str, list[int]] = {name: [] for name, _, _ in SETUPS}
    per_round: list[dict[str, int]] = []
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in SETUPS}
    failed: list[dict[str, Any]] = []
    bad = 0
    figures_recovery: dict[str, Any] = {}
    for round_ in range(rounds):
        per_round.append({})
        for name, ack, durable in SETUPS:
            wants_recovery = recovery and durable and "node_kill_recovery_ms" not in figures_recovery
            try:
                figures = await setup(name, ack=ack, durable=durable, recovery=wants_recovery, messages=messages)
            except Exception as exc:  # a failed round is reported, never silently dropped
                failed.append({"setup": name, "round": round_, "error": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            rates[name].append(figures["oneway_msgs_per_s_100b"])
            per_round[-1][name] = figures["oneway_msgs_per_s_100b"]
            cpu[name].append(figures["cpu_us_per_msg_100b"])
            bad += figures["oneway_bad"]
            figures_recovery.update({k: v for k, v in figures.items() if k.endswith("recovery_ms")})
            if "recovery_failed" in figures:
                failed.append({"setup": "recovery", "round": round_, "error": figures["recovery_failed"]})
    median = {name: round(statistics.median(v)) if v else None for name, v in rates.items()}
    best = {name: max(v) if v else None for name, v in rates.items()}
    return {
        "messages": messages,
        "window": WINDOW,
        "rounds": rounds,
        "fsync_interval": FSYNC_INTERVAL,
        "oneway_msgs_per_s_100b": {"median": median, "best": best, "all": rates},
        "ack_cost_pct": {
            "median": cost_pct(median["ack"], median["plain"]),
            "best": cost_pct(best["ack"], best["plain"]),
            "paired": paired_cost_pct(per_round, "ack"),
        },
        "durable_cost_pct": {
            "median": cost_pct(median["ack_durable"], median["plain"]),
            "best": cost_pct(best["ack_durable"], best["plain"]),
            "paired": paired_cost_pct(per_round, "ack_durable"),
        },
        "cpu_us_per_msg_100b": {
            name: {group: round(statistics.median(s[group] for s in samples), 1) for group in samples[0]}
            for name, samples in cpu.items()
            if samples
        },
        "bad": bad,
        "failed": failed,
        **figures_recovery,
    }


def run() -> dict[str, Any]:
    global FSYNC_INTERVAL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--messages", type=int, default=ONEWAY)
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--fsync-interval", type=float, default=FSYNC_INTERVAL)
    args = parser.parse_args()
    FSYNC_INTERVAL = args.fsync_interval
    try:
        return asyncio.run(main(args.rounds, args.messages, not args.no_recovery))
    except BaseException as exc:  # the JSON object is printed whatever happens
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


if __name__ == "__main__":
    print(json.dumps(run()))
