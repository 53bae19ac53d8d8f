"""The ``protofly`` command line.

Each part of protofly that has commands owns a Typer sub-app in its own package (``catalogue/cli.py``,
``msgnode/cli.py``, ...); this module only assembles them, so the commands live next to the code they drive.
"""

from __future__ import annotations

import typer

from protofly import log

app = typer.Typer(
    name="protofly",
    help="Deploy reTHINK protocol stubs on the fly: fetched, verified, sandboxed and supervised.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root(
    log_format: str = typer.Option("console", "--log-format", help="Log format on stderr: console or json."),
    log_level: str = typer.Option("WARNING", "--log-level", help="Log level: DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """protofly: a Python Hyperty Runtime core for protocol stubs deployed on the fly."""
    try:
        log.configure(log_format, log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def demo(
    as_json: bool = typer.Option(False, "--json", help="Print the events as JSON lines."),
    console: bool = typer.Option(
        False, "--console", help="Serve runtime A's web console on 127.0.0.1 and keep it open until Ctrl-C."
    ),
) -> None:
    """Two local domains, two runtimes, a stub deployed on the fly, a message node restart: watch it all."""
    from protofly.demo.run import main as run_demo

    raise typer.Exit(run_demo(as_json, console=console))


@app.command()
def version() -> None:
    """Print protofly's version."""
    from protofly import __version__

    typer.echo(__version__)


# --- sub-apps: each part with commands owns a Typer app in its own package ----------------------
from protofly.admin import commands as admin_commands  # noqa: E402
from protofly.catalogue import cli as catalogue_cli  # noqa: E402
from protofly.msgnode import cli as msgnode_cli  # noqa: E402
from protofly.sandbox import cli as sandbox_cli  # noqa: E402

app.add_typer(admin_commands.runtime_app, name="runtime")
app.add_typer(admin_commands.stub_app, name="stub")
app.command("send")(admin_commands.send)
app.add_typer(catalogue_cli.app, name="catalogue")
app.add_typer(catalogue_cli.keys_app, name="keys")
app.add_typer(msgnode_cli.app, name="msg-node")
app.add_typer(sandbox_cli.app, name="sandbox")
# (end of sub-apps)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
