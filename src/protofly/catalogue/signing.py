"""What a descriptor signature covers, and how it is written.

``signature`` = ``"ed25519:<key-id>:<base64 of the 64-byte signature>"``.  The signed bytes are the RFC 8785
(JCS) canonical JSON of the descriptor with ``signature`` removed and, inside ``sourcePackage``,
``sourceCode`` and ``encoding`` removed: those two are only the transport form of the source, whose
identity is ``sourcePackage.sha256`` (covered).  So one signature holds whether the source travels
embedded (catalogue layout), next to the descriptor (static layout) or as a separate source package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

import rfc8785

from protofly.catalogue.errors import E_SIGNATURE, CatalogueError, DescriptorError
from protofly.catalogue.keys import SigningKey

__all__ = [
    "SIGNATURE_SCHEME",
    "TRANSPORT_FIELDS",
    "canonical_bytes",
    "descriptor_digest",
    "format_signature",
    "parse_signature",
    "sign_descriptor",
    "signed_view",
]

SIGNATURE_SCHEME = "ed25519"
#: ``sourcePackage`` members left out of the signed bytes (the source's transport form).
TRANSPORT_FIELDS = frozenset({"sourceCode", "encoding"})


def signed_view(raw: dict[str, Any]) -> dict[str, Any]:
    """The descriptor as signed: no ``signature``, no ``sourcePackage.sourceCode``/``encoding``."""
    view = {k: v for k, v in raw.items() if k != "signature"}
    package = view.get("sourcePackage")
    if isinstance(package, dict):
        view["sourcePackage"] = {k: v for k, v in package.items() if k not in TRANSPORT_FIELDS}
    return view


def canonical_bytes(raw: dict[str, Any]) -> bytes:
    """RFC 8785 canonical JSON of :func:`signed_view`."""
    try:
        return rfc8785.dumps(signed_view(raw))
    except rfc8785.CanonicalizationError as exc:
        raise DescriptorError("", f"descriptor cannot be canonicalised (RFC 8785): {exc}") from None


def descriptor_digest(raw: dict[str, Any]) -> str:
    """sha256 of the canonical bytes: the descriptor's identity for the changed-bytes check."""
    return hashlib.sha256(canonical_bytes(raw)).hexdigest()


def format_signature(ident: str, signature: bytes) -> str:
    return f"{SIGNATURE_SCHEME}:{ident}:{base64.b64encode(signature).decode('ascii')}"


def parse_signature(text: str, *, url: str | None = None) -> tuple[str, bytes]:
    """``ed25519:<key-id>:<base64>`` → ``(key id, signature bytes)``; anything else is E_SIGNATURE."""
    scheme, _, rest = text.partition(":")
    ident, _, encoded = rest.partition(":")
    if scheme != SIGNATURE_SCHEME or not ident or not encoded:
        raise CatalogueError(
            E_SIGNATURE, f"signature {text[:40]!r} is not of the form 'ed25519:<key-id>:<base64>'", url=url
        )
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise CatalogueError(E_SIGNATURE, "signature is not valid base64", url=url) from None
    if len(signature) != 64:
        raise CatalogueError(E_SIGNATURE, f"an Ed25519 signature has 64 bytes, this one {len(signature)}", url=url)
    return ident, signature


def sign_descriptor(raw: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """A copy of ``raw`` with ``signature`` set; ``raw`` should already carry ``sourcePackage.sha256``."""
    signed = dict(raw)
    signed.pop("signature", None)
    signed["signature"] = format_signature(key.key_id, key.sign(canonical_bytes(signed)))
    return signed
