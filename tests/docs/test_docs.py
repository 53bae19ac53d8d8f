"""Every code block of README.md and docs/ that is meant to run is run here.

A block is meant to run when its fence says so: ```` ```python run ```` or ```` ```sh run ````.  It runs in a
scratch directory where ``stubs/`` is the repository's stub packages, with the project's executables on PATH.
Background processes a shell block starts are stopped with its process group.
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
FENCE = re.compile(r"^```(python|sh) run\s*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
TIMEOUT = 120


def runnable_blocks() -> list[tuple[str, int, str, str]]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for index, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8"))):
            blocks.append((path.relative_to(ROOT).as_posix(), index, match.group(1), match.group(2)))
    return blocks


BLOCKS = runnable_blocks()


def test_there_are_runnable_blocks() -> None:
    assert len(BLOCKS) >= 3, "the docs lost their runnable examples"


@pytest.mark.parametrize(("doc", "index", "language", "code"), BLOCKS, ids=[f"{b[0]}#{b[1]}" for b in BLOCKS])
def test_block_runs(tmp_path: Path, doc: str, index: int, language: str, code: str) -> None:
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
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
    assert process.returncode == 0, f"{doc} block {index} failed:\n{output}"


def test_complete_programs_are_marked_runnable() -> None:
    """A Python block that runs itself (``asyncio.run(...)``) is meant to run, so it must be fenced as such."""
    unmarked = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"^```python\s*\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S):
            if "asyncio.run(" in match.group(1):
                unmarked.append(path.name)
    assert unmarked == []
