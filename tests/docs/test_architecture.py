"""docs/architecture.md describes the code: its lifecycle table is ``supervision.TRANSITIONS``, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from protofly.supervision import TRANSITIONS

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
#: A row of the lifecycle table: | `phase` | `Event` | `_handler` | what it does |
ROW = re.compile(r"^\| `([a-z-]+)` \| `([A-Za-z]+)` \| `(_[a-z_]+)` \|", re.MULTILINE)


def test_the_lifecycle_table_is_the_transitions_table() -> None:
    documented = ROW.findall(ARCHITECTURE.read_text(encoding="utf-8"))
    actual = [(phase.value, event.__name__, handler.__name__) for (phase, event), handler in TRANSITIONS.items()]
    assert len(documented) == len(set(documented)), "a row of the lifecycle table appears twice"
    assert sorted(documented) == sorted(actual)


def test_no_reference_to_a_design_document_outside_the_repository() -> None:
    """Decisions live in docs/architecture.md; code and docs point there, not to a document we do not ship."""
    pattern = re.compile(
        r"D[E]SIGN|\.\.[/]shared|peers-and-st[a]ck|rethink-(wire|specs|runtime|js-stubs)[.]md"
    )  # spelled so that this file does not match itself
    offenders = []
    for top in ("src", "docs", "stubs", "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix not in (".py", ".md", ".json", ".toml"):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    offenders += [f"README.md: {line.strip()}" for line in readme.splitlines() if pattern.search(line)]
    assert offenders == []
