"""docs/operations.md is executable: its sh blocks run verbatim, its TOML blocks are the real configuration.

The rules (stated in the doc): ``sh`` blocks run in order from a scratch directory holding the repository's
``stubs/``; a ``toml`` block with a file name is written to that file; a line ending in ``&`` is a server
started in the background (waited for until its first line, stopped with SIGTERM at the end). The catalogue
server gets port 0 instead of 8080, and its real address replaces ``http://127.0.0.1:8080`` from then on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import textwrap
import tomllib

import msgspec
from tests.processes import alive as pid_alive

from protofly.config import RuntimeConfig

from .conftest import PROTOFLY, ROOT, clean_env

DOC = ROOT / "docs" / "operations.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
DOC_PORT = "http://127.0.0.1:8080"


def blocks() -> list[tuple[str, str, str]]:
    return [(lang, info.strip(), body) for lang, info, body in FENCE.findall(DOC.read_text())]


def commands(script: str) -> list[str]:
    joined = script.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def split(line: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=value protofly ...`` → environment additions and argv (with our own protofly executable)."""
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "protofly", f"the doc should only run protofly commands: {line}"
    return env, [PROTOFLY, *words[1:]]


def test_every_block_is_runnable_or_marked_as_text():
    langs = {lang for lang, _, _ in blocks()}
    assert langs <= {"sh", "toml", "text", "python"}, langs
    assert sum(lang == "sh" for lang, _, _ in blocks()) >= 3


def test_the_reference_file_is_exactly_the_defaults_and_names_every_setting():
    doc = DOC.read_text()
    (reference,) = [body for lang, info, body in blocks() if lang == "toml" and not info]
    config = RuntimeConfig.from_mapping(tomllib.loads(reference))
    assert config == RuntimeConfig(domain="a.test")
    for setting in msgspec.structs.fields(RuntimeConfig):
        assert re.search(rf"^#? ?{setting.name}\b|^\[{setting.name}\]", reference, re.M), setting.name
        assert f"| `{setting.name}` |" in doc and f"`PROTOFLY_{setting.name.upper()}`" in doc, setting.name
        if setting.default is not msgspec.NODEFAULT and setting.default is not None:
            default = json.dumps(setting.default).strip('"')
            row = next(line for line in doc.splitlines() if line.startswith(f"| `{setting.name}` |"))
            assert f"`{default}`" in row, (setting.name, row)


async def test_quick_start_runs_verbatim(tmp_path):
    work = tmp_path / "scratch"
    work.mkdir()
    (work / "stubs").symlink_to(ROOT / "stubs")
    background: list[tuple[asyncio.subprocess.Process, str]] = []
    replacements: dict[str, str] = {}
    outputs: dict[str, tuple[int, str, str]] = {}

    def substitute(text: str) -> str:
        for old, new in replacements.items():
            text = text.replace(old, new)
        return text

    try:
        for lang, info, body in blocks():
            if lang == "toml" and info:
                (work / info).write_text(substitute(body))
            if lang == "python":
                await run_python(substitute(body), work)
            if lang != "sh":
                continue
            for line in commands(body):
                if line.endswith("&"):
                    background.append(await start(line[:-1].strip(), work, replacements))
                    continue
                env, argv = split(substitute(line))
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=work,
                    env=clean_env(**env),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, f"{line}\n{out.decode()}{err.decode()}"
                outputs[" ".join(argv[1:3])] = (proc.returncode, out.decode(), err.decode())
    finally:
        codes = []
        for proc, _ in reversed(background):
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGTERM)
            codes.append(await asyncio.wait_for(proc.wait(), 20))
    assert codes == [0] * len(background) and len(background) == 2
    assert "b.test is live at" in outputs["stub deploy"][1]
    assert json.loads(outputs["send --config"][1])["body"]["value"] == {"text": "hello"}
    assert outputs["stub unload"][1].startswith("unloaded b.test")
    log = (work / "runtime.log").read_text().splitlines()
    assert log and all(json.loads(line)["logger"].startswith("protofly") for line in log)
    assert not (work / "state" / "admin.sock").exists()


async def start(line: str, work, replacements: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """Start a background server of the doc and wait (bounded) for its first line."""
    catalogue = "catalogue serve" in line
    if catalogue:
        line = line.replace("--port 8080", "--port 0")
    env, argv = split(line.replace(DOC_PORT, replacements.get(DOC_PORT, DOC_PORT)))
    log = (work / ("catalogue.log" if catalogue else "runtime.log")).open("wb")
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=work, env=clean_env(**env), stdout=asyncio.subprocess.PIPE, stderr=log
    )
    log.close()
    first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert pid_alive(proc.pid), f"{line} exited: {first}"
    if catalogue:
        assert first.startswith("catalogue serving http://127.0.0.1:"), first
        replacements[DOC_PORT] = first.split()[2]
    else:
        assert " listening on state/admin.sock" in first, first
    return proc, first


async def run_python(source: str, work) -> None:
    """Run the doc's Python example against the running runtime (its socket path made absolute)."""
    source = source.replace('"state/admin.sock"', repr(str(work / "state" / "admin.sock")))
    namespace: dict = {}
    exec(compile("async def example():\n" + textwrap.indent(source, "    "), str(DOC), "exec"), namespace)
    await asyncio.wait_for(namespace["example"](), 30)
