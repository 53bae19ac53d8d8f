"""Every code block of README.md and docs/ that is meant to run is run here.

A block is meant to run when its fence says so: ```` ```python run ```` or ```` ```sh run ````.  It runs in a
scratch directory where ``stubs/`` is the repository's stub packages, with the project's executables on PATH.
Background processes a shell block starts are stopped with its process group.

What a block prints is checked too: a ```` ```text prints ```` block right after it (blank lines only in
between) is its expected standard output, line for line.  In it, ``...`` stands for any text within a line
(a port, a token, a generated URL), and a line that is only ``...`` for any number of lines.  A runnable block
without one must print nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: A runnable block (language, code), then optionally its expected output after blank lines only.
FENCE = re.compile(
    r"^```(python|sh) run\s*\n(.*?)^```[ \t]*\n(?:[ \t]*\n)*(?:```text prints[ \t]*\n(.*?)^```)?", re.M | re.S
)
PRINTS = re.compile(r"^```text prints[ \t]*$", re.MULTILINE)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 120


def runnable_blocks() -> list[tuple[str, int, str, str, str | None]]:
    blocks = []
    for path in DOCS:
        for index, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8"))):
            language, code, expected = match.groups()
            blocks.append((path.relative_to(ROOT).as_posix(), index, language, code, expected))
    return blocks


def expected_output(expected: str) -> re.Pattern[str]:
    """The pattern an expected-output block stands for: ``...`` is any text in a line, or any lines."""
    parts = []
    for line in expected.splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*?".join(re.escape(piece) for piece in line.split("...")) + r"\n")
    return re.compile("".join(parts))


BLOCKS = runnable_blocks()


def test_there_are_runnable_blocks() -> None:
    assert len(BLOCKS) >= 3, "the docs lost their runnable examples"


def test_every_expected_output_belongs_to_a_runnable_block() -> None:
    """An expected-output block that follows no runnable block would never be checked."""
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        declared = len(PRINTS.findall(text))
        attached = sum(1 for match in FENCE.finditer(text) if match.group(3) is not None)
        assert declared == attached, f"{path.name}: a ```text prints block that follows no runnable block"


@pytest.mark.parametrize(
    ("text", "matches", "differs"),
    [
        ("a 1\nb\n", "a 1\nb\n", "a 1\nb\nc\n"),
        ("port ...\n", "port 8080\n", "port 1\nmore\n"),
        ("first\n...\nlast\n", "first\nx\ny\nlast\n", "first\nx\n"),
        ("cost: 1.5 (...)\n", "cost: 1.5 (ms)\n", "cost: 105 (ms)\n"),
    ],
)
def test_expected_output_patterns(text: str, matches: str, differs: str) -> None:
    assert expected_output(text).fullmatch(matches)
    assert not expected_output(text).fullmatch(differs)


@pytest.mark.parametrize(
    ("doc", "index", "language", "code", "expected"), BLOCKS, ids=[f"{b[0]}#{b[1]}" for b in BLOCKS]
)
def test_block_runs(tmp_path: Path, doc: str, index: int, language: str, code: str, expected: str | None) -> None:
    (tmp_path / "stubs").symlink_to(ROOT / "stubs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if language == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        output, errors = process.communicate(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    assert process.returncode == 0, f"{doc} block {index} failed:\n{output}{errors}"
    if expected is None:
        assert output == "", f"{doc} block {index} prints, but the doc shows no ```text prints block:\n{output}"
    else:
        assert expected_output(expected).fullmatch(output), (
            f"{doc} block {index} printed what its ```text prints block does not show.\n"
            f"--- expected\n{expected}--- printed\n{output}--- stderr\n{errors}"
        )


def test_complete_programs_are_marked_runnable() -> None:
    """A Python block that runs itself (``asyncio.run(...)``) is meant to run, so it must be fenced as such."""
    unmarked = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"^```python\s*\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S):
            if "asyncio.run(" in match.group(1):
                unmarked.append(path.name)
    assert unmarked == []
