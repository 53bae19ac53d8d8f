"""``protofly demo --json``, run as a user runs it: the story happens in order and nothing is left behind."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
from tests.processes import alive

from protofly.demo.backends import missing_servers

PROTOFLY = Path(sys.executable).parent / "protofly"


def first(events: list[dict], start: int, **match: object) -> int:
    for index in range(start, len(events)):
        if all(events[index].get(key) == value for key, value in match.items()):
            return index
    raise AssertionError(f"no event {match} after position {start}")


def test_demo_json_tells_the_story_in_order() -> None:
    done = subprocess.run([str(PROTOFLY), "demo", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert events[-1]["event"] == "done" and events[-1]["seconds"] < 15

    steps = [e["step"] for e in events if e["event"] == "step" and e["runtime"] == "A" and e["domain"] == "b.test"]
    assert steps == ["registry", "catalogue", "sandbox", "connect", "live"]
    deploy = first(events, 0, event="step", runtime="A", domain="b.test", step="registry")
    live = first(events, deploy, event="status", runtime="A", stub="b.test", value="live")
    request = first(events, 0, event="request")
    assert request < deploy  # the request is what triggered the deployment
    delivered = first(events, live, event="delivered")
    reply = first(events, delivered, event="reply", code=200)
    stopping = first(events, reply, event="node-stopping", domain="b.test")
    disconnected = first(events, stopping, event="status", runtime="A", stub="b.test", value="disconnected")
    live_again = first(events, disconnected, event="status", runtime="A", stub="b.test", value="live")
    second_reply = first(events, live_again, event="reply", code=200)
    assert events[second_reply]["body"]["value"] == {"pong": [2]}

    lives = [(e["runtime"], e["domain"]) for e in events if e["event"] == "live"]
    # A: its home stub and b.test's; B: only its home stub -- bob's reply went back through the stub that
    # brought alice's request, so B never deployed a.test's stub
    interworking = [] if missing_servers() else [("A", "chat.test"), ("A", "iot.test")]
    assert sorted(lives) == sorted([("A", "a.test"), ("A", "b.test"), ("B", "b.test"), *interworking])
    pids = [e["pid"] for e in events if e["event"] == "live" and e.get("pid")]
    assert len(pids) == 3 + len(interworking)
    if interworking:
        backends = next(e for e in events if e["event"] == "backends")
        pids += list(backends["pids"].values())
    assert not [pid for pid in pids if alive(pid)]


def test_demo_reaches_an_xmpp_user_and_an_mqtt_sensor() -> None:
    done = subprocess.run([str(PROTOFLY), "demo", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if missing_servers():
        skipped = next(e for e in events if e["event"] == "interworking-skipped")
        assert skipped["missing"] == missing_servers() and "apt-get install" in skipped["hint"]
        return
    send = first(events, 0, event="chat-send", to="xmpp://bob@chat.test")
    deploy = first(events, send, event="step", runtime="A", domain="chat.test", step="registry")
    heard = first(events, deploy, event="chat-heard")
    answer = first(events, heard, event="chat-answer", sender="xmpp://bob@chat.test")
    assert events[answer]["text"] == "hi, alice! you said: " + events[heard]["text"]
    subscribed = first(events, answer, event="subscribed", code=200)
    assert first(events, answer, event="step", runtime="A", domain="iot.test", step="registry") < subscribed
    updates = [e for e in events[subscribed:] if e["event"] == "sensor-update"]
    published = [e for e in events[subscribed:] if e["event"] == "sensor-published"]
    assert [(u["sender"], u["value"]) for u in updates] == [
        (f"mqtt://iot.test/{p['topic']}", p["value"]) for p in published
    ]
    assert len(updates) == 3
    # three different stubs, each deployed on the fly by runtime A
    deployed = {e["domain"] for e in events if e["event"] == "step" and e["runtime"] == "A" and e["step"] == "live"}
    assert {"b.test", "chat.test", "iot.test"} <= deployed


def test_demo_console_output() -> None:
    done = subprocess.run([str(PROTOFLY), "demo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deploy of b.test's stub in runtime A" in done.stdout
    assert "node-started b.test" in done.stdout
    assert "done in" in done.stdout
    if not missing_servers():
        assert "runtime A: stubs deployed on the fly" in done.stdout
        assert "alice ← xmpp://bob@chat.test" in done.stdout


async def test_demo_console_stays_open_until_ctrl_c_and_leaves_nothing() -> None:
    process = await asyncio.create_subprocess_exec(
        str(PROTOFLY), "demo", "--json", "--console", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    events: list[dict] = []
    try:
        async with asyncio.timeout(60):
            while not events or events[-1]["event"] != "console-open":
                line = await process.stdout.readline()
                assert line, "the demo ended before it said the console is open"
                events.append(json.loads(line))
        url = events[-1]["url"]
        assert url.startswith("http://127.0.0.1:")
        assert events[first(events, 0, event="console")]["url"] == url  # served from the start of the story
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as page:
                assert page.status == 200
                assert "protofly console" in await page.text()
            async with http.get(url + "api/state") as answer:
                state = await answer.json()
        rows = {row["domain"]: row for row in state["stubs"]}
        assert rows["b.test"]["status"] == "live"  # the story is over, the runtimes are still up
        assert [s["step"] for s in state["timelines"]["b.test"]["steps"]] == [
            "registry",
            "catalogue",
            "sandbox",
            "connect",
            "live",
        ]
        assert state["listener"]["loopback"] is True
        pids = [e["pid"] for e in events if e["event"] == "live" and e.get("pid")]
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    assert json.loads(out.decode().splitlines()[-1])["event"] == "done"
    assert not [pid for pid in pids if alive(pid)]
