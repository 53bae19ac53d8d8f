"""The one exception of the catalogue, and its error codes.

Every way a stub can fail to reach the runtime has its own code, because each one calls for a different
reaction: a fetch error is retried or served from the cache, a digest or signature error is an attack or
a broken publisher and is never retried, a rollback or changed-bytes error needs a human decision
(``protofly catalogue forget``).  The message always says what happened and at which URL.
"""

from __future__ import annotations

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
    "CatalogueError",
    "DescriptorError",
]

#: The catalogue could not be reached or did not answer usefully (connection, timeout, HTTP status,
#: too many redirects); the next candidate URL, then the cache, are tried.
E_FETCH = "E_FETCH"
#: A response body (or a file) is over the size limit; the transfer was cut off.
E_TOO_LARGE = "E_TOO_LARGE"
#: A URL the client refuses to use: plain http to a non-loopback host, or http without opt-in.
E_INSECURE = "E_INSECURE"
#: The descriptor or source package is not what the runtime can rely on; the message names the field.
E_SCHEMA = "E_SCHEMA"
#: The decoded source does not match ``sourcePackage.sha256``.
E_DIGEST = "E_DIGEST"
#: The Ed25519 signature does not verify over the canonical descriptor.
E_SIGNATURE = "E_SIGNATURE"
#: The signature is by a key the trust store does not pin for the expected domain.
E_UNTRUSTED = "E_UNTRUSTED"
#: The descriptor carries no signature and the policy is ``require``.
E_UNSIGNED = "E_UNSIGNED"
#: The catalogue offers an older version than the one cached.
E_ROLLBACK = "E_ROLLBACK"
#: The catalogue offers different bytes under the version already cached.
E_CHANGED = "E_CHANGED"

#: Every code with the one-line meaning shown by ``docs/catalogue.md`` and the CLI.
CODES: dict[str, str] = {
    E_FETCH: "catalogue unreachable or answered with an error",
    E_TOO_LARGE: "response over the size limit",
    E_INSECURE: "URL refused by the transport policy (https only; http only to loopback on opt-in)",
    E_SCHEMA: "descriptor or source package malformed",
    E_DIGEST: "source does not match sourcePackage.sha256",
    E_SIGNATURE: "signature does not verify",
    E_UNTRUSTED: "signing key not pinned for the domain",
    E_UNSIGNED: "unsigned descriptor under policy 'require'",
    E_ROLLBACK: "older version than the cached one",
    E_CHANGED: "publisher changed bytes under the same version",
}


class CatalogueError(Exception):
    """A stub that cannot be used; ``code`` is one of :data:`CODES`, ``url`` where it came from."""

    def __init__(self, code: str, message: str, *, url: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown catalogue error code {code!r}")
        self.code = code
        self.url = url
        self.message = message
        text = f"{code}: {message}"
        if url and url not in message:
            text = f"{text} (at {url})"
        super().__init__(text)


class DescriptorError(CatalogueError):
    """A schema error that names the field (``sourcePackage.sha256``, ``sandbox.memoryMB``...)."""

    def __init__(self, field: str, problem: str, *, url: str | None = None) -> None:
        self.field = field
        super().__init__(E_SCHEMA, f"{field}: {problem}" if field else problem, url=url)
