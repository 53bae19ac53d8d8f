"""``protofly runtime serve``, ``stub deploy|list|unload|retry`` and ``send``, run as real subprocesses."""

from __future__ import annotations

import json
import signal
import socket

from .conftest import clean_env, descendants, json_lines, pid_alive, run, start_runtime

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

        code, out, err = await run("stub", "list", "--json", *where)
        assert code == 0, err
        (stub,) = json.loads(out)
        assert stub["domain"] == "b.test" and stub["status"] == "live"
        assert stub["isolation"]["process"] is True and "missing" in stub["isolation"]
        assert stub["restarts"] == 0 and pid_alive(stub["pid"])
        assert [event["value"] for event in stub["history"]][-1] == "live"

        code, out, err = await run("stub", "list", *where)
        assert code == 0, err
        assert "b.test" in out and stub["url"] in out and "live" in out and "process" in out

        code, out, err = await run("send", "--to", "hyperty://b.test/alice", "--body", '{"n": 7}', *where)
        assert code == 0, err
        answer = json.loads(out)
        assert answer["body"]["code"] == 200 and answer["body"]["value"] == {"n": 7}
        assert answer["to"].endswith("/cli") and answer["body"]["via"] == stub["url"]

        code, out, err = await run("stub", "deploy", "c.test", *where)  # signed by a key nobody trusts
        assert code == 1
        assert "error: deployment of c.test failed (503): E_UNTRUSTED" in err
        assert "protofly stub retry c.test" in err

        code, out, err = await run("stub", "unload", "b.test", *where)
        assert code == 0, err
        assert out.startswith(f"unloaded b.test ({stub['url']})")
        assert not pid_alive(stub["pid"])
        code, out, err = await run("stub", "list", "--json", *where)
        assert [s["domain"] for s in json.loads(out)] == ["c.test"]
        code, out, err = await run("stub", "unload", "b.test", *where)
        assert code == 1 and "no stub is loaded for b.test" in err

        # a message to b.test deploys its stub again on demand; a second runtime may not take the socket
        code, out, err = await run("send", "--to", "hyperty://b.test/bob", "--type", "create", *where)
        assert code == 0, err
        second = await run("runtime", "serve", "--domain", "a.test", *where)
        assert second[0] == 2 and "already listening" in second[2]
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


async def test_no_runtime_means_exit_2_with_a_hint(tmp_path):
    for args in (
        ("stub", "list", "--state-dir", str(tmp_path)),
        ("stub", "deploy", "b.test", "--admin", str(tmp_path / "x.sock")),
        ("send", "--to", "hyperty://b.test/x", "--state-dir", str(tmp_path)),
    ):
        code, out, err = await run(*args)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "start one with 'protofly runtime serve'" in err
    code, _, err = await run("stub", "list", env=clean_env(PROTOFLY_ADMIN=str(tmp_path / "env.sock")))
    assert code == 2 and str(tmp_path / "env.sock") in err
    code, _, err = await run("stub", "list")
    assert code == 2 and "give --admin SOCKET, --state-dir DIR or --config FILE" in err
    config = tmp_path / "runtime.toml"
    config.write_text(f'state_dir = "{tmp_path / "from-config"}"\n')  # no domain: only state_dir matters
    code, _, err = await run("stub", "list", "--config", str(config))
    assert code == 2 and str(tmp_path / "from-config" / "admin.sock") in err


async def test_bad_input_is_refused_before_anything_runs(tmp_path):
    where = ("--state-dir", str(tmp_path))
    code, _, err = await run("send", "--to", "hyperty://b.test/x", "--body", '{"text": ', *where)
    assert code == 2 and "--body" in err and "not valid JSON" in err
    code, _, err = await run("send", "--to", "hyperty://b.test/x", "--body", "[1, 2]", *where)
    assert code == 2 and "expected a JSON object" in err
    code, _, err = await run("send", "--to", "hyperty://b.test/x", "--timeout", "0", *where)
    assert code == 2 and "--timeout" in err

    code, _, err = await run("runtime", "serve", "--domain", "a.test")
    assert code == 2 and "give --state-dir" in err
    code, _, err = await run("runtime", "serve", "--domain", "a.test", "--policy", "maybe", *where)
    assert code == 2 and "policy: must be one of require, warn, off" in err
    code, _, err = await run("runtime", "serve", "--domain", "a.test", "--catalogue", "b.test", *where)
    assert code == 2 and "expected DOMAIN=URL" in err
    code, _, err = await run("runtime", "serve", "--domain", "a.test", "--catalogue", "b.test=ftp://x", *where)
    assert code == 2 and "catalogues: base URL for b.test" in err
    code, _, err = await run("runtime", "serve", *where)
    assert code == 2 and "domain: missing" in err
    (tmp_path / "bad.toml").write_text("domain = 'a.test'\nspeed = 3\n")
    code, _, err = await run("runtime", "serve", "--config", str(tmp_path / "bad.toml"), *where)
    assert code == 2 and "unknown setting 'speed'" in err
    (tmp_path / "file").write_text("not a socket")
    code, _, err = await run("runtime", "serve", "--domain", "a.test", "--admin", str(tmp_path / "file"), *where)
    assert code == 2 and "exists and is not a socket" in err
    assert (tmp_path / "file").read_text() == "not a socket"
    code, _, err = await run(
        "runtime", "serve", "--domain", "a.test", "--trust-store", str(tmp_path / "none.json"), *where
    )
    assert code == 1 and "cannot start the runtime" in err and "trust store file not found" in err
    assert not (tmp_path / "admin.sock").exists()  # the socket it had claimed is gone again


async def test_help_for_every_command():
    for args, words in (
        (("runtime", "serve", "--help"), ("--catalogue", "--admin", "SIGTERM")),
        (("runtime", "info", "--help"), ("--admin", "--config", "--state-dir")),
        (("stub", "deploy", "--help"), ("--json", "live")),
        (("stub", "list", "--help"), ("--json", "restarts")),
        (("stub", "unload", "--help"), ("--admin",)),
        (("stub", "retry", "--help"), ("backoff",)),
        (("send", "--help"), ("--to", "--body", "--timeout", "--from")),
    ):
        code, out, err = await run(*args, env=clean_env(COLUMNS="200"))
        assert code == 0, err
        assert out.lstrip().startswith("Usage: protofly") and all(word in out for word in words), (args, out)
    code, out, _ = await run("--help", env=clean_env(COLUMNS="200"))
    assert code == 0 and all(f"│ {name} " in out for name in ("runtime", "stub", "send"))
