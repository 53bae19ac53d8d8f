"""docs/operations.md documents every metric the runtime and the message node export (name, type, labels)."""

from __future__ import annotations

from pathlib import Path

from protofly.msgnode.metrics import GAUGES
from protofly.observe.metrics import METRICS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")


def row(name: str) -> str:
    return next((line for line in DOC.splitlines() if line.startswith(f"| `{name}` |")), "")


def test_every_runtime_metric_is_documented_with_its_type_and_labels() -> None:
    for metric in METRICS:
        line = row(metric.name)
        assert line, f"{metric.name} is not in the metrics table"
        assert f"| {metric.type} |" in line, (metric.name, line)
        for label in metric.labels:
            assert f"`{label}`" in line, (metric.name, label)


def test_every_node_gauge_is_documented() -> None:
    for name, _, _ in GAUGES:
        assert "| gauge |" in row(name), name


def test_the_readme_shows_the_console_screenshot() -> None:
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "](docs/console.png)" in readme
    png = (root / "docs" / "console.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
