"""``protofly sandbox probe``: the isolation record of an empty stub, as an operator sees it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from protofly.cli import app


def test_probe_prints_the_record_and_strict_fails_on_a_missing_layer():
    runner = CliRunner()
    result = runner.invoke(app, ["sandbox", "probe", "--no-bwrap"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["process"] is True
    assert record["env"] == "scrubbed"
    assert "bwrap: disabled by configuration" in record["missing"]
    strict = runner.invoke(app, ["sandbox", "probe", "--no-bwrap", "--strict"])
    assert strict.exit_code == 1
