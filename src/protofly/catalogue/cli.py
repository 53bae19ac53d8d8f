"""``protofly catalogue check|serve|publish|fetch|forget`` and ``protofly keys generate|trust``."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from protofly.address import AddressError, validate_domain
from protofly.catalogue.errors import CODES, E_DIGEST, CatalogueError
from protofly.catalogue.keys import KeyFileError, TrustStore, generate_keypair, load_public_record
from protofly.catalogue.model import (
    DEFAULT_MAX_DESCRIPTOR_SIZE,
    KNOWN_FIELDS,
    decode_json,
    parse_descriptor,
    parse_source_package,
    sha256_hex,
)
from protofly.catalogue.publish import PublishError, publish
from protofly.catalogue.verify import POLICIES, check_policy, verify_stub
from protofly.tasks import TaskSet

__all__ = ["app", "keys_app"]

app = typer.Typer(help="Protocol stub catalogue: check, serve, publish and fetch descriptors.", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 publishing keys and the trust store.", no_args_is_help=True)


@app.callback()
def _catalogue() -> None:
    """Protocol stub catalogue: check, serve, publish and fetch descriptors."""


@keys_app.callback()
def _keys() -> None:
    """Ed25519 publishing keys and the trust store."""


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


# -- check ----------------------------------------------------------------------------------------------


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="A descriptor (.ps.json), a source package, or the reTHINK model.json.")],
    trust: Annotated[Path | None, typer.Option("--trust", help="Trust store: also verify the signature.")] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="Domain whose key must have signed.")] = None,
    policy: Annotated[str, typer.Option("--policy", help=f"With --trust: {'/'.join(POLICIES)}.")] = "require",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate a file; print a summary (exit 0) or exactly what is wrong (exit 1)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise _fail(f"{file}: cannot read: {exc.strerror}") from None
    try:
        summary = _check(file, data, trust, domain, policy)
    except CatalogueError as exc:
        raise _fail(f"{file}: {exc.code}: {exc.message}") from None
    except (KeyFileError, ValueError) as exc:
        raise _fail(f"{file}: {exc}") from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{file}: OK ({summary.pop('kind')})")
    for key, value in summary.items():
        typer.echo(f"  {key}: {_show(value)}")


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | dict):
        return json.dumps(value) if value else "-"
    return str(value)


def _check(file: Path, data: bytes, trust: Path | None, domain: str | None, policy: str) -> dict[str, Any]:
    obj = decode_json(data, what="file", url=str(file), max_size=DEFAULT_MAX_DESCRIPTOR_SIZE)
    if isinstance(obj, list) and obj and all(isinstance(o, dict) and "resourcedefs" in o for o in obj):
        return _model_summary(obj)
    if isinstance(obj, dict) and "objectName" not in obj and "sourceCode" in obj:
        package = parse_source_package(obj, url=str(file))
        package_source, warning = package.decode()
        return {
            "kind": "source package",
            "sourceCodeClassname": package.classname,
            "encoding": package.encoding,
            "sourceBytes": len(package_source),
            "warning": warning,
        }
    descriptor = parse_descriptor(obj, url=str(file))
    summary: dict[str, Any] = {"kind": "protocol stub descriptor", **descriptor.summary()}
    source, where = _source_for(file, descriptor)
    if source is not None:
        summary["source"] = f"{where} ({len(source)} bytes)"
    if trust is not None:
        if domain is None:
            raise ValueError("--trust needs --domain (the domain whose key must have signed)")
        if source is None:
            raise ValueError("no source found (embedded or next to the file) to verify the digest against")
        verdict = verify_stub(
            descriptor,
            source,
            trust=TrustStore.load(trust),
            policy=check_policy(policy),
            signer_domain=validate_domain(domain),
            url=str(file),
        )
        summary["verified"] = f"signed by key {verdict.signer} of {domain}" if verdict.signer else "not signed"
        summary["warnings"] = list(verdict.warnings)
    elif source is not None and descriptor.source_sha256 is not None:
        if sha256_hex(source) != descriptor.source_sha256:
            raise CatalogueError(E_DIGEST, f"{where} does not match sourcePackage.sha256", url=str(file))
        summary["digest"] = "source matches sourcePackage.sha256"
    return summary


def _source_for(file: Path, descriptor: Any) -> tuple[bytes | None, str | None]:
    package = descriptor.source_package
    if package is not None and package.embedded:
        return package.decode()[0], "embedded sourceCode"
    if file.name.endswith(".ps.json"):
        stem = file.name[: -len(".ps.json")]
        for suffix in (".ps.py", ".ps.js"):
            sibling = file.with_name(stem + suffix)
            if sibling.is_file():
                return sibling.read_bytes(), sibling.name
    return None, None


def _model_summary(model: list[dict[str, Any]]) -> dict[str, Any]:
    """reTHINK's catalogue object model (``model/model.json``): which types, and the stub's mandatory fields."""
    types = {o.get("name"): o for o in model}
    stub = next((o for o in model if str(o.get("name", "")).lower() in ("protostub", "protocolstub")), None)
    mandatory = sorted(r["name"] for r in (stub or {}).get("resourcedefs", []) if r.get("mandatory"))
    fields = [r["name"] for r in (stub or {}).get("resourcedefs", [])]
    return {
        "kind": "reTHINK catalogue object model",
        "objectTypes": sorted(str(t) for t in types),
        "protocolstubFields": fields,
        "protocolstubMandatory": mandatory,
        "fieldsNotModelled": sorted(set(fields) - KNOWN_FIELDS),
    }


# -- serve ----------------------------------------------------------------------------------------------


@app.command()
def serve(
    directory: Annotated[Path, typer.Argument(help="Published directory (holds .well-known/protocolstub/).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: pick a free one; the URL is printed).")] = 8080,
    default: Annotated[str | None, typer.Option("--default", help="Stub served for the name 'default'.")] = None,
    max_age: Annotated[
        int | None, typer.Option("--max-age", help="Cache-Control max-age in seconds (0: no-cache).")
    ] = None,
) -> None:
    """Serve a published directory until SIGINT/SIGTERM (SIGHUP reloads it); prints the URL once listening."""
    if not directory.is_dir():
        raise _fail(f"{directory}: not a directory")
    asyncio.run(_serve(directory, host, port, default, max_age))


async def _serve(directory: Path, host: str, port: int, default: str | None, max_age: int | None) -> None:
    from protofly.catalogue.server import CatalogueServer

    stop = asyncio.Event()
    reloads = TaskSet("catalogue reloads")
    loop = asyncio.get_running_loop()
    async with CatalogueServer(directory, host, port, default=default, max_age=max_age) as server:

        def reload() -> None:
            reloads.spawn(server.reload(), name="catalogue reload")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        for problem in server.problems:
            typer.echo(f"warning: {problem}", err=True)
        typer.echo(f"catalogue serving {server.base_url} ({len(server.names)} stubs: {', '.join(server.names)})")
        await stop.wait()
        await reloads.close()


# -- publish --------------------------------------------------------------------------------------------


@app.command("publish")
def publish_command(
    stub_dir: Annotated[Path, typer.Argument(help="Stub package: stub.py + descriptor.json.")],
    into: Annotated[Path, typer.Option("--into", help="Published directory to write into.")],
    key: Annotated[Path, typer.Option("--key", help="Private key (PEM) of the publishing domain.")],
    domain: Annotated[
        str | None, typer.Option("--domain", help="Publishing domain (default: from the key file name <domain>.key).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Publish under this name (e.g. a domain).")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Override the template's version.")] = None,
) -> None:
    """Sign a stub package and write it into a published directory; prints the descriptor's path."""
    owner = domain or (key.name[: -len(".key")] if key.name.endswith(".key") else None)
    if owner is None:
        raise _fail("--domain is required when the key file is not named <domain>.key")
    try:
        path = publish(stub_dir, into, key, owner, name=name, version=version)
    except (PublishError, KeyFileError, AddressError, CatalogueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(path))


# -- fetch / forget -------------------------------------------------------------------------------------


def _resolver(entries: list[str] | None) -> dict[str, str]:
    out = {}
    for entry in entries or []:
        domain, sep, base = entry.partition("=")
        if not sep or not base:
            raise _fail(f"--resolver {entry!r}: expected DOMAIN=BASE_URL")
        out[domain] = base
    return out


@app.command()
def fetch(
    reference: Annotated[str, typer.Argument(help="A domain (its default stub) or a catalogue URL.")],
    home: Annotated[str, typer.Option("--home", help="The runtime's home domain (for the fallback).")],
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="Where the cache lives.")] = None,
    resolver: Annotated[
        list[str] | None,
        typer.Option("--resolver", help="DOMAIN=BASE_URL (repeatable), e.g. b.test=http://127.0.0.1:8080"),
    ] = None,
    trust: Annotated[Path | None, typer.Option("--trust", help="Trust store file.")] = None,
    policy: Annotated[str, typer.Option("--policy", help="/".join(POLICIES))] = "require",
    allow_http_loopback: Annotated[
        bool, typer.Option("--allow-http-loopback", help="Allow plain http to 127.0.0.0/8.")
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Revalidate even when the cache is fresh.")] = False,
) -> None:
    """Fetch and verify a stub as the runtime would; print a JSON summary (exit 1 with the error code)."""
    from protofly.catalogue.client import CatalogueClient, describe

    try:
        store = TrustStore.load(trust) if trust else None
        client = CatalogueClient(
            home_domain=home,
            state_dir=state_dir,
            resolver=_resolver(resolver),
            trust=store,
            policy=policy,
            allow_http_loopback=allow_http_loopback,
        )
    except (KeyFileError, ValueError) as exc:
        raise _fail(str(exc)) from None

    async def run() -> dict[str, Any]:
        async with client:
            return describe(await client.fetch_stub(reference, refresh=refresh))

    try:
        typer.echo(json.dumps(asyncio.run(run()), indent=2))
    except CatalogueError as exc:
        raise _fail(f"{exc}\n({exc.code}: {CODES[exc.code]})") from None


@app.command()
def forget(
    reference: Annotated[str, typer.Argument(help="A domain or catalogue URL whose cached stub to drop.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where the cache lives.")],
    home: Annotated[str, typer.Option("--home", help="The runtime's home domain.")] = "localhost",
) -> None:
    """Drop a cached stub: the explicit way to accept a rollback or changed bytes (E_ROLLBACK, E_CHANGED)."""
    from protofly.catalogue.client import CatalogueClient

    async def run() -> int:
        async with CatalogueClient(home_domain=home, state_dir=state_dir) as client:
            return await client.forget(reference)

    try:
        count = asyncio.run(run())
    except CatalogueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"forgot {count} cached stub(s) for {reference}")


# -- keys -----------------------------------------------------------------------------------------------


@keys_app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory for <domain>.key and <domain>.pub.json.")],
    domain: Annotated[str, typer.Option("--domain", help="The publishing domain that owns the key.")],
    trust_store: Annotated[
        Path | None, typer.Option("--trust-store", help="Also pin the public key in this trust store file.")
    ] = None,
) -> None:
    """Write a new Ed25519 key pair (private key mode 0600); prints both paths and the key id."""
    try:
        private_path, public_path = generate_keypair(out, domain)
        owner, raw = load_public_record(public_path)
        ident = _pin(trust_store, owner, raw) if trust_store else None
    except (KeyFileError, AddressError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"private key: {private_path}")
    typer.echo(f"public key:  {public_path}")
    if ident:
        typer.echo(f"pinned key {ident} for {owner} in {trust_store}")


@keys_app.command("trust")
def trust_command(
    public_key: Annotated[Path, typer.Argument(help="A <domain>.pub.json record.")],
    store: Annotated[Path, typer.Option("--store", help="Trust store file (created if missing).")],
) -> None:
    """Pin a domain's public key in a trust store."""
    try:
        domain, raw = load_public_record(public_key)
        ident = _pin(store, domain, raw)
    except KeyFileError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"pinned key {ident} for {domain} in {store}")


def _pin(store_path: Path, domain: str, raw: bytes) -> str:
    store = TrustStore.load(store_path) if store_path.exists() else TrustStore()
    ident = store.add(domain, raw)
    store.save(store_path)
    return ident
