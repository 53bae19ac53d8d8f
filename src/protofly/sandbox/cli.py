"""``protofly sandbox ...``: see which isolation layers a stub gets on this machine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import typer

from protofly.sandbox import Boundary
from protofly.sandbox.process import ProcessSandbox

app = typer.Typer(help="Inspect the stub sandbox.", no_args_is_help=True)

_PROBE_STUB = b"from protofly.stub import ProtoStub\n\n\nclass Probe(ProtoStub):\n    pass\n"


@app.command()
def probe(
    bwrap: bool = typer.Option(True, "--bwrap/--no-bwrap", help="Use bubblewrap if it is installed."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 if any layer is missing."),
) -> None:
    """Deploy an empty stub and print its isolation record: the layers active and the ones missing."""
    record = asyncio.run(_probe(bwrap))
    typer.echo(json.dumps(record, indent=2))
    if strict and record["missing"]:
        raise typer.Exit(1)


async def _probe(use_bwrap: bool) -> dict[str, Any]:
    url = "hyperty-runtime://probe.invalid/cli/protostub/1"
    sandbox = ProcessSandbox(use_bwrap=None if use_bwrap else False, prestart=0)
    try:
        component = await sandbox.deploy(
            url=url,
            source=_PROBE_STUB,
            config={},
            classname="Probe",
            limits=None,
            boundary=Boundary(
                runtime_url="hyperty-runtime://probe.invalid/cli",
                runtime_domain="probe.invalid",
                stub_domain="probe.invalid",
            ),
            on_message=lambda msg: None,
            on_exit=lambda reason: None,
        )
        return dict(component.isolation)
    finally:
        await sandbox.close()
