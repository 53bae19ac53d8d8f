"""``protofly runtime serve|info``, ``protofly stub deploy|list|unload|retry`` and ``protofly send``.

``runtime serve`` is the one long-running process: it holds the :class:`~protofly.runtime.Runtime` and serves
the admin API (:mod:`protofly.admin.server`) on a unix socket.  The other commands are its clients
(:mod:`protofly.admin.client`); they find the socket from ``--admin``, ``$PROTOFLY_ADMIN``, ``--state-dir`` or
the configuration file, in that order.  What they print is :mod:`protofly.admin.views`.

Exit codes: 0 success; 1 the operation failed (a deploy that did not go live, a non-2xx response, an unknown
stub); 2 a usage or configuration error, or no runtime listening at the socket.

Only typer, the standard library and :mod:`protofly.admin.protocol` (itself standard library only) are
imported at module level: ``protofly --help`` must stay fast, so aiohttp, rich and the runtime are imported
inside the commands that use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from protofly.admin.protocol import ENV_ADMIN, AdminError, AdminUnavailableError, admin_socket

if TYPE_CHECKING:
    from protofly.admin.client import AdminClient
    from protofly.config import RuntimeConfig

__all__ = ["runtime_app", "send", "stub_app"]

runtime_app = typer.Typer(help="Run a protofly runtime with its admin API, or ask a running one.", no_args_is_help=True)
stub_app = typer.Typer(help="Deploy, list, unload and retry protocol stubs in a running runtime.", no_args_is_help=True)

#: Exit codes shared by every command here.
EXIT_FAILED = 1
EXIT_USAGE = 2


@runtime_app.callback()
def _runtime_group() -> None:
    """Run a protofly runtime with its admin API, or ask a running one."""


@stub_app.callback()
def _stub_group() -> None:
    """Deploy, list, unload and retry protocol stubs in a running runtime."""


# -- options the client commands share ---------------------------------------------------------------------

AdminOption = Annotated[
    Path | None,
    typer.Option(
        "--admin",
        help="The runtime's admin socket (default: $PROTOFLY_ADMIN, else <state_dir>/admin.sock).",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Runtime configuration file (TOML); its state_dir locates the socket."),
]
StateDirOption = Annotated[
    Path | None, typer.Option("--state-dir", help="The runtime's state directory (holds admin.sock).")
]


def _fail(text: str, code: int = EXIT_FAILED) -> typer.Exit:
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code)


# -- runtime serve ------------------------------------------------------------------------------------------


@runtime_app.command("serve")
def serve(
    config: ConfigOption = None,
    domain: Annotated[str | None, typer.Option("--domain", help="The runtime's home domain.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="State directory: runtime URL, catalogue cache, admin.sock.")
    ] = None,
    catalogue: Annotated[
        list[str] | None,
        typer.Option(
            "--catalogue", help="DOMAIN=URL: where DOMAIN's catalogue is served (repeatable).", show_default=False
        ),
    ] = None,
    trust_store: Annotated[
        Path | None, typer.Option("--trust-store", help="Trust store file pinning publishers' keys.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Signature policy: require, warn or off.", show_default=False)
    ] = None,
    allow_http_loopback: Annotated[
        bool | None,
        typer.Option(
            "--allow-http-loopback/--no-allow-http-loopback",
            help="Allow plain http:// catalogues on loopback addresses.",
            show_default=False,
        ),
    ] = None,
    resolver_only: Annotated[
        bool | None,
        typer.Option(
            "--resolver-only/--no-resolver-only",
            help="Contact only the catalogues given with --catalogue (no DNS look-ups of catalogue.<domain>).",
            show_default=False,
        ),
    ] = None,
    admin: AdminOption = None,
) -> None:
    """Run a runtime until SIGINT/SIGTERM, serving its admin API on a unix socket.

    Settings come from the file, then PROTOFLY_* variables, then these options. Prints one line once the
    admin API listens; on SIGINT/SIGTERM every stub is stopped and the socket removed (exit 0).
    """
    catalogues = catalogue_flags(catalogue or [])
    overrides = {
        "domain": domain,
        "state_dir": state_dir,
        "trust_store": trust_store,
        "policy": policy,
        "allow_http_loopback": allow_http_loopback,
        "resolver_only": resolver_only,
    }
    settings = load_config(config, overrides, catalogues)
    path = admin_socket(admin=admin, state_dir=settings.state_dir)
    if path is None:
        raise _fail(
            "no place for the admin socket: give --state-dir (the socket is <state_dir>/admin.sock) or --admin SOCKET",
            EXIT_USAGE,
        )
    raise typer.Exit(asyncio.run(_serve(settings, path)))


def catalogue_flags(values: list[str]) -> dict[str, str]:
    catalogues: dict[str, str] = {}
    for value in values:
        domain, sep, url = value.partition("=")
        if not sep or not domain.strip() or not url.strip():
            raise typer.BadParameter(f"expected DOMAIN=URL, got {value!r}", param_hint="--catalogue")
        catalogues[domain.strip().lower()] = url.strip()
    return catalogues


def load_config(config: Path | None, overrides: dict[str, Any], catalogues: dict[str, str]) -> RuntimeConfig:
    """File, then environment, then flags; ``--catalogue`` adds to (or replaces entries of) the file's map."""
    from protofly.config import ConfigError, RuntimeConfig

    try:
        settings = RuntimeConfig.load(config, **overrides)
        if catalogues:
            settings.catalogues = {**settings.catalogues, **catalogues}
            settings.validate()
    except ConfigError as exc:
        raise _fail(f"configuration: {exc}", EXIT_USAGE) from None
    return settings


async def _serve(settings: RuntimeConfig, path: Path) -> int:
    from protofly.admin.server import AdminServer
    from protofly.log import get_logger
    from protofly.runtime import Runtime

    log = get_logger("protofly.cli")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = AdminServer(path, max_request_size=settings.max_message_size)
    try:
        await server.claim()
    except AdminError as exc:
        typer.echo(f"error: cannot serve the admin API: {exc.text}", err=True)
        return EXIT_USAGE
    try:
        runtime = Runtime(settings)
        try:
            await runtime.__aenter__()
        except Exception as exc:  # whatever stops it starting is reported in one line, not a traceback
            typer.echo(f"error: cannot start the runtime: {exc}", err=True)
            with contextlib.suppress(Exception):
                await runtime.close()
            return EXIT_FAILED
        try:
            await server.start(runtime)
            typer.echo(f"protofly runtime {runtime.runtime_url} listening on {path}")
            await stop.wait()
            log.info("stopping the runtime", runtime_url=runtime.runtime_url)
        finally:
            await server.close()
            await runtime.close()
    finally:
        await server.close()
    log.info("runtime stopped")
    return 0


@runtime_app.command("info")
def info(admin: AdminOption = None, config: ConfigOption = None, state_dir: StateDirOption = None) -> None:
    """Print the running runtime's URL, domain, pid and configuration as JSON."""

    async def work(client: AdminClient) -> int:
        typer.echo(json.dumps(await client.runtime(), indent=2))
        return 0

    _run_client(admin, config, state_dir, work)


# -- the client side ------------------------------------------------------------------------------------------


def _find_socket(admin: Path | None, config: Path | None, state_dir: Path | None) -> Path:
    """The same rule as the server: --admin, $PROTOFLY_ADMIN, --state-dir, then the configuration's state_dir."""
    from protofly.config import ConfigError, RuntimeConfig

    path = admin_socket(admin=admin, state_dir=state_dir)
    if path is not None:
        return path
    try:
        # Only state_dir matters here; a placeholder domain lets a file that leaves the domain to the
        # command line (or to the environment) still tell us where the state lives.
        settings = RuntimeConfig.load(config, domain="localhost")
    except ConfigError as exc:
        raise _fail(f"configuration: {exc}", EXIT_USAGE) from None
    path = admin_socket(state_dir=settings.state_dir)
    if path is None:
        raise _fail(
            f"where is the runtime? give --admin SOCKET, --state-dir DIR or --config FILE (or set {ENV_ADMIN})",
            EXIT_USAGE,
        )
    return path


def _run_client(
    admin: Path | None,
    config: Path | None,
    state_dir: Path | None,
    work: Callable[[AdminClient], Awaitable[int]],
) -> None:
    """Connect, run ``work``, and map the admin errors onto one-line messages and exit codes."""
    path = _find_socket(admin, config, state_dir)
    from protofly.admin.client import AdminClient

    async def main() -> int:
        async with AdminClient(path) as client:
            return await work(client)

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        raise _fail("interrupted (a deployment already started goes on in the runtime)", 130) from None
    except AdminUnavailableError as exc:
        raise _fail(exc.text, EXIT_USAGE) from None
    except AdminError as exc:
        raise _fail(exc.text, EXIT_FAILED) from None
    raise typer.Exit(code)


# -- stub deploy / retry ---------------------------------------------------------------------------------------


@stub_app.command("deploy")
def deploy(
    reference: Annotated[
        str, typer.Argument(help="A domain (its default stub) or a catalogue URL.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw events as JSON lines.")] = False,
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Deploy a domain's stub and show the steps live; exit 0 once live, 1 with the reason otherwise."""

    async def work(client: AdminClient) -> int:
        return await _follow(client.deploy(reference), reference, as_json)

    _run_client(admin, config, state_dir, work)


@stub_app.command("retry")
def retry(
    domain: Annotated[str, typer.Argument(help="The domain whose stub to deploy again.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw events as JSON lines.")] = False,
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Forget a stub's crash history and backoff and deploy it again now, fresh from its catalogue."""

    async def work(client: AdminClient) -> int:
        return await _follow(client.retry(domain), domain, as_json)

    _run_client(admin, config, state_dir, work)


async def _follow(lines: AsyncIterator[dict[str, Any]], label: str, as_json: bool) -> int:
    """Show a deploy stream as it comes; the exit code is the result's."""
    if as_json:
        result: dict[str, Any] = {}
        async for line in lines:
            typer.echo(json.dumps(line))
            result = line
        return 0 if result.get("ok") else EXIT_FAILED
    from protofly.admin.views import DeployView, console

    view = DeployView(console(), label)
    with view.spinner():
        async for line in lines:
            view.show(line)
    return 0 if view.finish() else EXIT_FAILED


# -- stub list / unload ---------------------------------------------------------------------------------------


@stub_app.command("list")
def list_stubs(
    as_json: Annotated[bool, typer.Option("--json", help="Print the stubs as a JSON array.")] = False,
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """List the runtime's stubs: domain, stub URL, status, since, isolation layers, restarts."""

    async def work(client: AdminClient) -> int:
        stubs = await client.stubs()
        if as_json:
            typer.echo(json.dumps(stubs, indent=2))
        else:
            from protofly.admin.views import console, stub_table

            console().print(stub_table(stubs))
        return 0

    _run_client(admin, config, state_dir, work)


@stub_app.command("credentials")
def credentials(
    domain: Annotated[str, typer.Argument(help="The domain whose credentials to replace.", show_default=False)],
    file: Annotated[
        Path | None, typer.Option("--file", help="A JSON object of credentials (default: read standard input).")
    ] = None,
    retry_now: Annotated[bool, typer.Option("--retry", help="Then deploy the stub again now (stub retry).")] = False,
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Replace a domain's credentials (e.g. after its server refused them: status failed, cause auth)."""
    try:
        text = file.read_text(encoding="utf-8") if file is not None else sys.stdin.read()
        given = json.loads(text)
    except (OSError, ValueError) as exc:
        raise _fail(f"credentials: cannot read a JSON object ({exc})", EXIT_USAGE) from None
    if not isinstance(given, dict):
        raise _fail("credentials: expected a JSON object", EXIT_USAGE)

    async def work(client: AdminClient) -> int:
        await client.set_credentials(domain, given)
        typer.echo(f"credentials for {domain} set")
        return await _follow(client.retry(domain), domain, False) if retry_now else 0

    _run_client(admin, config, state_dir, work)


@stub_app.command("unload")
def unload(
    domain: Annotated[str, typer.Argument(help="The domain whose stub to unload.", show_default=False)],
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Disconnect and remove a domain's stub (its process ends; waiting messages get 503)."""

    async def work(client: AdminClient) -> int:
        stub = await client.unload(domain)
        typer.echo(f"unloaded {stub['domain']} ({stub['url']})")
        return 0

    _run_client(admin, config, state_dir, work)


# -- send -------------------------------------------------------------------------------------------------------


def send(
    to: Annotated[
        str, typer.Option("--to", help="Destination address, e.g. hyperty://b.test/alice.", show_default=False)
    ],
    type_: Annotated[str, typer.Option("--type", help="Message type.")] = "read",
    body: Annotated[
        str | None, typer.Option("--body", help='Message body as a JSON object, e.g. \'{"text": "hi"}\'.')
    ] = None,
    sender: Annotated[
        str | None,
        typer.Option("--from", help="Sender address (default: <runtimeURL>/cli).", show_default=False),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, max=300.0, help="Seconds to wait for the response.")
    ] = 10.0,
    admin: AdminOption = None,
    config: ConfigOption = None,
    state_dir: StateDirOption = None,
) -> None:
    """Send a reTHINK message through the runtime and print the response; exit 0 for 2xx, 1 otherwise.

    A destination in a domain without a stub deploys that domain's stub first (on demand).
    """
    msg: dict[str, Any] = {"type": type_, "to": to}
    if body is not None:
        msg["body"] = _json_object(body)
    if sender is not None:
        msg["from"] = sender

    async def work(client: AdminClient) -> int:
        answer = await client.send(msg, timeout=timeout)
        typer.echo(json.dumps(answer, indent=2))
        code = str((answer.get("body") or {}).get("code"))
        return 0 if code.isdigit() and 200 <= int(code) < 300 else EXIT_FAILED

    _run_client(admin, config, state_dir, work)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", param_hint="--body"
        ) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"expected a JSON object, got {type(value).__name__}", param_hint="--body")
    return value
