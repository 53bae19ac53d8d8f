"""Turn a stub package (``stubs/<name>/``) into a published, signed catalogue entry.

A stub package is a directory with:

* ``stub.py``: the stub's Python source (another file when the template names it in ``sourceFile``);
* ``descriptor.json``: the descriptor template: ``objectName`` (defaults to the directory name),
  ``version`` (required: rollback protection compares it), ``language`` (default ``python``),
  ``description``, ``configuration``, ``constraints``, optional ``sandbox``
  (``{"memoryMB", "cpuSeconds", "openFiles"}``), optional ``sourceCodeClassname``, and any other
  reTHINK field, which is kept.

Publishing writes reTHINK's static layout into the target directory, which
:class:`~protofly.catalogue.server.CatalogueServer` (or any static web server) serves:
``<into>/.well-known/protocolstub/<name>.ps.py`` (the source, written first) and ``<name>.ps.json`` (the
descriptor with ``publisher``, ``sourcePackage: {sourceCodeClassname, sha256}`` and ``signature``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from protofly.address import validate_domain
from protofly.catalogue.errors import CatalogueError, DescriptorError
from protofly.catalogue.keys import SigningKey, TrustStore
from protofly.catalogue.model import parse_descriptor, sha256_hex
from protofly.catalogue.signing import sign_descriptor
from protofly.catalogue.verify import verify_stub

__all__ = ["SOURCE_FILE", "TEMPLATE_FILE", "PublishError", "publish", "read_stub_package"]

TEMPLATE_FILE = "descriptor.json"
SOURCE_FILE = "stub.py"
#: Template keys that steer publishing and are not part of the published descriptor.
_TEMPLATE_ONLY = ("sourceFile", "sourceCodeClassname")


class PublishError(ValueError):
    """A stub package that cannot be published; the text names the file and the field."""


def read_stub_package(stub_dir: Path) -> tuple[dict[str, Any], bytes, str]:
    """``(template, source bytes, source file name)`` of a stub package directory."""
    stub_dir = Path(stub_dir)
    template_path = stub_dir / TEMPLATE_FILE
    try:
        template = json.loads(template_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishError(f"{template_path}: missing (a stub package needs {TEMPLATE_FILE})") from None
    except (OSError, ValueError) as exc:
        raise PublishError(f"{template_path}: unreadable: {exc}") from None
    if not isinstance(template, dict):
        raise PublishError(f"{template_path}: expected a JSON object")
    source_name = template.get("sourceFile", SOURCE_FILE)
    if not isinstance(source_name, str) or "/" in source_name or source_name.startswith("."):
        raise PublishError(f"{template_path}: sourceFile: expected a file name in the package, got {source_name!r}")
    try:
        source = (stub_dir / source_name).read_bytes()
    except OSError as exc:
        raise PublishError(f"{stub_dir / source_name}: cannot read the stub source: {exc.strerror}") from None
    return template, source, source_name


def publish(
    stub_dir: Path,
    into: Path,
    key: SigningKey | Path,
    domain: str,
    *,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Sign and write one stub into ``into``; return the path of the published ``<name>.ps.json``.

    ``domain`` is the publishing domain whose key signs: the stub's own domain, or the home domain when
    publishing a fallback stub named after another domain (``name="legacy.test"``).  ``name`` and
    ``version`` override the template's ``objectName`` and ``version``.
    """
    domain = validate_domain(domain)
    signing_key = key if isinstance(key, SigningKey) else SigningKey.load(Path(key), domain)
    if signing_key.domain is not None and signing_key.domain != domain:
        raise PublishError(f"the key belongs to {signing_key.domain}, not to the publishing domain {domain}")
    template, source, _ = read_stub_package(Path(stub_dir))
    descriptor = _descriptor(
        template, source, domain, name or template.get("objectName") or Path(stub_dir).name, version
    )
    try:
        parsed = parse_descriptor(descriptor, url=str(Path(stub_dir) / TEMPLATE_FILE))
    except DescriptorError as exc:
        raise PublishError(str(exc)) from None
    signed = sign_descriptor(descriptor, signing_key)
    _self_check(signed, source, signing_key, domain)
    folder = Path(into) / ".well-known" / "protocolstub"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".ps.py" if parsed.is_python else ".ps.js"
    _write_atomic(folder / f"{parsed.object_name}{suffix}", source)
    target = folder / f"{parsed.object_name}.ps.json"
    _write_atomic(target, (json.dumps(signed, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return target


def _descriptor(template: dict[str, Any], source: bytes, domain: str, name: Any, version: str | None) -> dict[str, Any]:
    published = {
        k: v for k, v in template.items() if k not in _TEMPLATE_ONLY and k not in ("signature", "sourcePackage")
    }
    published["objectName"] = name
    if version is not None:
        published["version"] = version
    if not published.get("version"):
        raise PublishError("version: required to publish (rollback protection compares versions)")
    if not isinstance(published["version"], str):
        raise PublishError(f'version: write it as a string, e.g. "{published["version"]}"')
    published.setdefault("language", "python")
    published.setdefault("description", "")
    published["publisher"] = domain
    package: dict[str, Any] = {"sha256": sha256_hex(source)}
    classname = template.get("sourceCodeClassname")
    if classname is not None:
        package = {"sourceCodeClassname": classname, **package}
    published["sourcePackage"] = package
    return published


def _self_check(signed: dict[str, Any], source: bytes, key: SigningKey, domain: str) -> None:
    """Verify what is about to be published exactly as a runtime will, so a broken entry never ships."""
    trust = TrustStore()
    trust.add(domain, key.public_raw)
    try:
        verify_stub(parse_descriptor(signed), source, trust=trust, policy="require", signer_domain=domain)
    except CatalogueError as exc:  # pragma: no cover - would mean signing and verifying disagree
        raise PublishError(f"self-check failed: {exc}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
