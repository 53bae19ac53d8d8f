"""The ``protofly catalogue`` and ``protofly keys`` commands, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import sys

import pytest

from .conftest import ECHO, ROOT

PROTOFLY = str(ROOT / ".venv" / "bin" / "protofly")
if not (ROOT / ".venv" / "bin" / "protofly").exists():  # pragma: no cover - installed elsewhere
    PROTOFLY = str(__import__("shutil").which("protofly") or sys.exit("protofly is not installed"))


async def run(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PROTOFLY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"objectName": "x", "language": "python", "configuration": 5}', "configuration: expected an object"),
        ('{"language": "python"}', "objectName: missing"),
        ('{"objectName": "x", "language": "python", "sandbox": {"memoryGB": 1}}', "sandbox.memoryGB: unknown limit"),
        ("[1, 2", "not valid JSON"),
    ],
)
async def test_check_broken_files(tmp_path, content, words):
    path = tmp_path / "broken.ps.json"
    path.write_text(content)
    code, out, err = await run("catalogue", "check", str(path))
    assert code == 1 and out == ""
    assert "E_SCHEMA" in err and words in err and str(path) in err


async def test_check_a_missing_file(tmp_path):
    code, _, err = await run("catalogue", "check", str(tmp_path / "nope.json"))
    assert code == 1 and "cannot read" in err


async def test_keys_publish_check_serve_fetch(tmp_path):
    keys, pub, state, trust = tmp_path / "keys", tmp_path / "pub", tmp_path / "state", tmp_path / "trust.json"
    code, out, err = await run(
        "keys", "generate", "--out", str(keys), "--domain", "b.test", "--trust-store", str(trust)
    )
    assert code == 0, err
    assert stat.S_IMODE((keys / "b.test.key").stat().st_mode) == 0o600
    assert "pinned key" in out and list(json.loads(trust.read_text())["domains"]) == ["b.test"]

    code, out, err = await run("catalogue", "publish", str(ECHO), "--into", str(pub), "--key", str(keys / "b.test.key"))
    assert code == 0, err
    published = out.strip()
    assert published.endswith("echo.ps.json")

    code, out, err = await run("catalogue", "check", published, "--trust", str(trust), "--domain", "b.test")
    assert code == 0, err
    assert "verified: signed by key" in out and "echo.ps.py" in out

    code, _, err = await run("catalogue", "check", published, "--trust", str(trust), "--domain", "c.test")
    assert code == 1 and "E_UNTRUSTED" in err

    serve = await asyncio.create_subprocess_exec(
        PROTOFLY,
        "catalogue",
        "serve",
        str(pub),
        "--port",
        "0",
        "--default",
        "echo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(serve.stdout.readline(), 20)).decode()
        assert line.startswith("catalogue serving http://127.0.0.1:"), line
        base = line.split()[2]
        fetch = (
            "catalogue",
            "fetch",
            "b.test",
            "--home",
            "a.test",
            "--resolver",
            f"b.test={base}",
            "--trust",
            str(trust),
            "--allow-http-loopback",
            "--state-dir",
            str(state),
        )
        code, out, err = await run(*fetch)
        assert code == 0, err
        result = json.loads(out)
        assert result["objectName"] == "echo" and result["signerDomain"] == "b.test" and not result["fromCache"]
        strict = [a for a in fetch if a != "--allow-http-loopback"]
        strict[-1] = str(tmp_path / "other-state")  # (with the stub cached, the cache would answer)
        code, out, err = await run(*strict)  # plain http is refused without the opt-in
        assert code == 1 and "E_INSECURE" in err
    finally:
        serve.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.wait(), 20) == 0

    code, out, err = await run(*fetch)  # the catalogue is down: the cache serves
    assert code == 0, err
    assert json.loads(out)["offline"] is True
    code, out, _ = await run("catalogue", "forget", "b.test", "--state-dir", str(state))
    assert code == 0 and "forgot 1" in out
    code, _, err = await run(*fetch)
    assert code == 1 and "E_FETCH" in err and "nothing is cached" in err


async def test_publish_errors_are_reported(tmp_path):
    code, _, err = await run("catalogue", "publish", str(ECHO), "--into", str(tmp_path), "--key", str(tmp_path / "k"))
    assert code == 1 and "--domain is required" in err
    code, _, err = await run(
        "catalogue", "publish", str(ECHO), "--into", str(tmp_path), "--key", str(tmp_path / "b.test.key")
    )
    assert code == 1 and "cannot read private key" in err
