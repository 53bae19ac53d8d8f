"""The catalogue: protocol stub descriptors, their signatures, a catalogue server and a verifying,
caching client.

The runtime asks one question: ``await client.fetch_stub("b.test")`` → a :class:`VerifiedStub` whose
descriptor and source passed every check, or a :class:`CatalogueError` whose ``code`` says which check
failed.  See ``docs/catalogue.md``.  The server lives in :mod:`protofly.catalogue.server` (imported on
demand, so the runtime does not load aiohttp's server side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protofly.catalogue.errors import (
    CODES,
    E_CHANGED,
    E_DIGEST,
    E_FETCH,
    E_INSECURE,
    E_ROLLBACK,
    E_SCHEMA,
    E_SIGNATURE,
    E_TOO_LARGE,
    E_UNSIGNED,
    E_UNTRUSTED,
    CatalogueError,
    DescriptorError,
)
from protofly.catalogue.fetch import FetchTimings, VerifiedStub
from protofly.catalogue.keys import KeyFileError, SigningKey, TrustStore, generate_keypair, key_id
from protofly.catalogue.model import (
    ProtocolStubDescriptor,
    SandboxLimits,
    SourcePackage,
    compare_versions,
    parse_descriptor,
    parse_source_package,
)
from protofly.catalogue.publish import PublishError, publish
from protofly.catalogue.signing import canonical_bytes, sign_descriptor
from protofly.catalogue.verify import POLICIES, verify_stub

if TYPE_CHECKING:
    from protofly.catalogue.client import CatalogueClient, ClientStats, describe

#: Imported on first use: the client pulls in aiohttp (~0.3 s), which ``catalogue check``, ``publish`` and
#: ``keys`` never need.
_LAZY = {"CatalogueClient", "ClientStats", "describe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from protofly.catalogue import client

        return getattr(client, name)
    raise AttributeError(f"module 'protofly.catalogue' has no attribute {name!r}")


__all__ = [
    "CODES",
    "E_CHANGED",
    "E_DIGEST",
    "E_FETCH",
    "E_INSECURE",
    "E_ROLLBACK",
    "E_SCHEMA",
    "E_SIGNATURE",
    "E_TOO_LARGE",
    "E_UNSIGNED",
    "E_UNTRUSTED",
    "POLICIES",
    "CatalogueClient",
    "CatalogueError",
    "ClientStats",
    "DescriptorError",
    "FetchTimings",
    "KeyFileError",
    "ProtocolStubDescriptor",
    "PublishError",
    "SandboxLimits",
    "SigningKey",
    "SourcePackage",
    "TrustStore",
    "VerifiedStub",
    "canonical_bytes",
    "compare_versions",
    "describe",
    "generate_keypair",
    "key_id",
    "parse_descriptor",
    "parse_source_package",
    "publish",
    "sign_descriptor",
    "verify_stub",
]
