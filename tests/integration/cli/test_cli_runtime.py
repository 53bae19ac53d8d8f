"""``protofly runtime serve``, ``stub deploy|list|unload|retry`` and ``send``, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import pytest
import typer
from tests.processes import alive as pid_alive
from tests.processes import descendants
from typer.testing import CliRunner

from protofly.admin import commands

from .conftest import clean_env, json_lines, run, start_runtime

STEPS = ("registry", "catalogue", "sandbox", "connect", "live")


async def test_deploy_list_send_unload_and_a_clean_stop(world, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a socket file left behind by a runtime that was killed
    stale.bind(str(state / "admin.sock"))
    stale.close()
    runtime = await start_runtime(world, state, root_options=("--log-format", "json", "--log-level", "INFO"))
    where = ("--state-dir", str(state))
    try:
        assert runtime.line.startswith("protofly runtime hyperty-runtime://a.test/")
        assert (state / "admin.sock").stat().st_mode & 0o777 == 0o600

        code, out, err = await run("stub", "deploy", "b.test", *where)
        assert code == 0, out + err
        for step in STEPS:
            assert f"✓ {step}" in out
        assert "status    deploying" in out and "status    live" in out
        assert "timeline" in out and "b.test is live at hyperty-runtime://a.test/" in out

        # independent commands run at once (each is its own process; the runtime serves them concurrently)
        listed, table, sent, untrusted = await asyncio.gather(
            run("stub", "list", "--json", *where),
            run("stub", "list", *where),
            run("send", "--to", "hyperty://b.test/alice", "--body", '{"n": 7}', *where),
            run("stub", "deploy", "c.test", *where),  # signed by a key nobody trusts
        )
        code, out, err = listed
        assert code == 0, err
        (stub,) = [s for s in json.loads(out) if s["domain"] == "b.test"]
        assert stub["status"] == "live"
        assert stub["isolation"]["process"] is True and "missing" in stub["isolation"]
        assert stub["restarts"] == 0 and pid_alive(stub["pid"])
        assert [event["value"] for event in stub["history"]][-1] == "live"

        code, out, err = table
        assert code == 0, err
        assert "b.test" in out and stub["url"] in out and "live" in out and "process" in out

        code, out, err = sent
        assert code == 0, err
        answer = json.loads(out)
        assert answer["body"]["code"] == 200 and answer["body"]["value"] == {"n": 7}
        assert answer["to"].endswith("/cli") and answer["body"]["via"] == stub["url"]

        code, out, err = untrusted
        assert code == 1
        assert "error: deployment of c.test failed (503): E_UNTRUSTED" in err
        assert "protofly stub retry c.test" in err

        code, out, err = await run("stub", "unload", "b.test", *where)
        assert code == 0, err
        assert out.startswith(f"unloaded b.test ({stub['url']})")
        assert not pid_alive(stub["pid"])
        listed, again, second = await asyncio.gather(
            run("stub", "list", "--json", *where),
            run("stub", "unload", "b.test", *where),
            run("runtime", "serve", "--domain", "a.test", *where),  # a second runtime may not take the socket
        )
        assert [s["domain"] for s in json.loads(listed[1])] == ["c.test"]
        assert again[0] == 1 and "no stub is loaded for b.test" in again[2]
        assert second[0] == 2 and "already listening" in second[2]

        # a message to b.test deploys its stub again, on demand
        code, out, err = await run("send", "--to", "hyperty://b.test/bob", "--type", "create", *where)
        assert code == 0, err
        children = descendants(runtime.pid)
        assert children, "the live stub runs in child processes"
    finally:
        exit_code = await runtime.stop(signal.SIGTERM)
    assert exit_code == 0
    assert not [pid for pid in children if pid_alive(pid)]
    assert not (state / "admin.sock").exists()
    records = [json.loads(line) for line in runtime.log_lines()]  # every stderr line is a JSON object
    events = {record["event"] for record in records}
    assert {"runtime started", "admin API listening", "stub deployment failed", "runtime stopped"} <= events
    assert all({"ts", "level", "logger"} <= record.keys() for record in records)


async def test_deploy_json_events_and_retry(world, tmp_path):
    state = tmp_path / "state"
    runtime = await start_runtime(world, state)
    where = ("--admin", str(state / "admin.sock"))
    try:
        code, out, err = await run("stub", "deploy", "--json", "b.test", *where)
        assert code == 0, err
        events = json_lines(out)
        assert events[0] == {**events[0], "event": "status", "value": "deploying"}
        assert [e["step"] for e in events if e["event"] == "step"] == list(STEPS)
        result = events[-1]
        assert result["event"] == "result" and result["ok"] is True and result["status"] == "live"
        assert [s["name"] for s in result["steps"]] == list(STEPS) and result["signer"]

        code, out, err = await run("stub", "deploy", "b.test", *where)  # already live: no new deployment
        assert code == 0 and "b.test is already live" in out

        code, out, err = await run("stub", "retry", "b.test", *where)
        assert code == 0, err
        assert "b.test is already live" in out  # a live stub is left alone

        code, out, err = await run("stub", "retry", "--json", "c.test", *where)
        assert code == 1 and "no stub is loaded for c.test" in err
        code, out, err = await run("stub", "deploy", "--json", "c.test", *where)
        assert code == 1
        result = json_lines(out)[-1]
        assert result["ok"] is False and result["cause"] == "E_UNTRUSTED" and result["code"] == 503
        code, out, err = await run("stub", "retry", "c.test", *where)  # still untrusted, fetched afresh
        assert code == 1 and "E_UNTRUSTED" in err and "status    deploying" in out

        code, out, err = await run("runtime", "info", *where)
        assert code == 0, err
        info = json.loads(out)
        assert info["domain"] == "a.test" and info["pid"] == runtime.pid and info["stubs"] == 2
        assert info["config"]["deploy_timeout"] == 10.0  # PROTOFLY_DEPLOY_TIMEOUT reached the runtime
    finally:
        assert await runtime.stop(signal.SIGINT) == 0


COLUMNS = clean_env(COLUMNS="300")


async def run_all(cases):
    """Run independent commands at once (each is a fresh process): [(args, env)] → [(code, out, err)]."""
    return await asyncio.gather(*(run(*args, env=env) for args, env in cases))


async def test_no_runtime_means_exit_2_with_a_hint(tmp_path):
    config = tmp_path / "runtime.toml"
    config.write_text(f'state_dir = "{tmp_path / "from-config"}"\n')  # no domain: only state_dir matters
    cases = [
        (("stub", "list", "--state-dir", str(tmp_path)), None, str(tmp_path / "admin.sock")),
        (("stub", "deploy", "b.test", "--admin", str(tmp_path / "x.sock")), None, str(tmp_path / "x.sock")),
        (("send", "--to", "hyperty://b.test/x", "--state-dir", str(tmp_path)), None, "admin.sock"),
        (("stub", "list"), clean_env(PROTOFLY_ADMIN=str(tmp_path / "env.sock")), str(tmp_path / "env.sock")),
        (("stub", "list", "--config", str(config)), None, str(tmp_path / "from-config" / "admin.sock")),
    ]
    results = await run_all([(args, env) for args, env, _ in cases])
    for (args, _, where), (code, out, err) in zip(cases, results, strict=True):
        assert code == 2 and out == "", (args, err)
        assert err.count("\n") == 1 and "start one with 'protofly runtime serve'" in err and where in err, err
    code, _, err = await run("stub", "list")
    assert code == 2 and "give --admin SOCKET, --state-dir DIR or --config FILE" in err


async def test_bad_body_json_and_a_missing_state_dir_as_real_commands(tmp_path):
    results = await run_all(
        [
            (("send", "--to", "hyperty://b.test/x", "--body", '{"text": ', "--state-dir", str(tmp_path)), COLUMNS),
            (("runtime", "serve", "--domain", "a.test"), COLUMNS),
        ]
    )
    (code, out, err), (serve_code, _, serve_err) = results
    assert code == 2 and out == "" and "Invalid value for --body: not valid JSON: Expecting value" in err
    assert serve_code == 2 and "no place for the admin socket: give --state-dir" in serve_err


@pytest.mark.parametrize(
    ("args", "expected", "words"),
    [
        (("send", "--to", "x://y", "--body", "[1, 2]"), 2, "--body: expected a JSON object, got list"),
        (("send", "--to", "x://y", "--body", '"text"'), 2, "--body: expected a JSON object, got str"),
        (("send", "--to", "x://y", "--timeout", "0"), 2, "--timeout"),
        (("runtime", "serve", "--policy", "maybe"), 2, "policy: must be one of require, warn, off"),
        (("runtime", "serve", "--catalogue", "b.test"), 2, "expected DOMAIN=URL"),
        (("runtime", "serve", "--catalogue", "b.test=ftp://x"), 2, "catalogues: base URL for b.test"),
        (("runtime", "serve", "--domain", "-"), 2, "configuration: domain:"),
        (("runtime", "serve", "--config", "{bad}"), 2, "unknown setting 'speed'"),
        (("runtime", "serve", "--config", "{missing}"), 2, "cannot read configuration file"),
        (("runtime", "serve", "--admin", "{file}"), 2, "exists and is not a socket"),
        (("runtime", "serve", "--trust-store", "{missing}"), 1, "cannot start the runtime: "),
    ],
)
def test_bad_input_is_refused_with_the_reason(tmp_path, args, expected, words):
    """In-process (typer's runner on our sub-apps, not the root, which would configure logging)."""
    (tmp_path / "bad.toml").write_text("domain = 'a.test'\nspeed = 3\n")
    (tmp_path / "file").write_text("not a socket")
    paths = {"bad": tmp_path / "bad.toml", "missing": tmp_path / "none.json", "file": tmp_path / "file"}
    args = [arg.format(**paths) for arg in args]
    if args[0] == "runtime" and "--domain" not in args:
        args += ["--domain", "a.test"]
    args += ["--state-dir", str(tmp_path)]
    result = invoke(args)
    assert result.exit_code == expected, result.output
    assert words in " ".join(result.output.replace("│", " ").split()), result.output
    assert (tmp_path / "file").read_text() == "not a socket"
    assert not (tmp_path / "admin.sock").exists()  # a runtime that could not start released its socket


def invoke(args: list[str]):
    """Run a command of ours in-process; the terminal width is pinned so that messages are not wrapped."""
    send = typer.Typer()
    send.command()(commands.send)  # a one-command app: its options come right away
    app = {"runtime": commands.runtime_app, "stub": commands.stub_app, "send": send}[args[0]]
    return CliRunner().invoke(app, args[1:], env={"COLUMNS": "300"}, catch_exceptions=False)


async def test_help_for_every_command():
    code, out, err = await run("--help", env=clean_env(COLUMNS="200"))
    assert code == 0, err
    assert all(f"│ {name} " in out for name in ("runtime", "stub", "send", "catalogue"))
    for args, words in (
        (("runtime", "serve", "--help"), ("--catalogue", "--admin", "SIGTERM")),
        (("runtime", "info", "--help"), ("--admin", "--config", "--state-dir")),
        (("stub", "deploy", "--help"), ("--json", "live")),
        (("stub", "list", "--help"), ("--json", "restarts")),
        (("stub", "unload", "--help"), ("--admin",)),
        (("stub", "retry", "--help"), ("backoff",)),
        (("send", "--help"), ("--to", "--body", "--timeout", "--from")),
    ):
        result = invoke(list(args))
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output and all(word in result.output for word in words), (args, result.output)


def test_flags_win_over_environment_and_file_and_catalogues_merge(tmp_path, monkeypatch):
    config = tmp_path / "runtime.toml"
    config.write_text(
        'domain = "a.test"\npolicy = "warn"\n[catalogues]\n"b.test" = "http://127.0.0.1:1"\n"c.test" = "http://127.0.0.1:2"\n'
    )
    monkeypatch.setenv("PROTOFLY_POLICY", "off")
    monkeypatch.setenv("PROTOFLY_DEPLOY_TIMEOUT", "3")
    settings = commands.load_config(
        config, {"policy": "require", "domain": None}, commands.catalogue_flags(["C.test=http://127.0.0.1:3"])
    )
    assert settings.domain == "a.test" and settings.policy == "require" and settings.deploy_timeout == 3.0
    assert settings.catalogues == {"b.test": "http://127.0.0.1:1", "c.test": "http://127.0.0.1:3"}
