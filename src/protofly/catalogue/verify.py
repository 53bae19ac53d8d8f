"""The verification decisions, without I/O: is this descriptor + source acceptable, and may it replace
what is cached?

Order (each failure has its own code): signature present (policy) → key pinned for the expected domain →
signature valid → the signed descriptor pins the source (``sourcePackage.sha256``) → the source matches
it → the signed name and publisher match the request.  Then, against the cache: not older (rollback), and
not different under the same version (changed bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from protofly.catalogue.errors import (
    E_CHANGED,
    E_DIGEST,
    E_ROLLBACK,
    E_SIGNATURE,
    E_UNSIGNED,
    E_UNTRUSTED,
    CatalogueError,
    DescriptorError,
)
from protofly.catalogue.keys import TrustStore
from protofly.catalogue.model import ProtocolStubDescriptor, compare_versions, sha256_hex
from protofly.catalogue.signing import canonical_bytes, parse_signature

__all__ = ["POLICIES", "Verdict", "check_policy", "check_signer_still_trusted", "check_update", "verify_stub"]

#: ``require``: only signed stubs by a pinned key.  ``warn``: unsigned reTHINK artefacts pass with a loud
#: warning (signed ones are verified in full).  ``off``: signatures are not checked (the digest still is).
POLICIES = ("require", "warn", "off")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification established: who signed (key id) and the digests the cache keys on."""

    signer: str | None
    sha256: str
    descriptor_digest: str
    warnings: tuple[str, ...] = ()


def verify_stub(
    descriptor: ProtocolStubDescriptor,
    source: bytes,
    *,
    trust: TrustStore | None,
    policy: str,
    signer_domain: str,
    requested_name: str | None = None,
    url: str | None = None,
) -> Verdict:
    """Accept ``descriptor`` + ``source`` or raise :class:`CatalogueError` with the code of the first failure."""
    warnings: list[str] = []
    canonical = canonical_bytes(descriptor.raw)
    signer: str | None = None
    if policy != "off":
        if descriptor.signature is None:
            if policy == "require":
                raise CatalogueError(
                    E_UNSIGNED,
                    f"descriptor {descriptor.object_name!r} for {signer_domain} is unsigned and the policy is "
                    "'require' (use policy 'warn' to accept unsigned reTHINK artefacts)",
                    url=url,
                )
            warnings.append(f"UNSIGNED stub {descriptor.object_name!r} for {signer_domain} accepted (policy 'warn')")
        else:
            signer = _check_signature(descriptor, canonical, trust, signer_domain, url)
            if descriptor.source_sha256 is None:
                raise DescriptorError(
                    "sourcePackage.sha256", "required in a signed descriptor (it pins the source)", url=url
                )
    digest = sha256_hex(source)
    expected = descriptor.source_sha256
    if expected is not None and digest != expected:
        raise CatalogueError(
            E_DIGEST,
            f"source of {descriptor.object_name!r} has sha256 {digest[:16]}…, the descriptor says {expected[:16]}…",
            url=url,
        )
    if expected is None:
        warnings.append(f"no sourcePackage.sha256 in {descriptor.object_name!r}: the source is not pinned")
    name_problem = _name_mismatch(descriptor, requested_name)
    if name_problem and signer is not None:
        raise DescriptorError("objectName", name_problem, url=url)
    if name_problem:
        warnings.append(name_problem)
    return Verdict(signer, digest, sha256_hex(canonical + b"\n" + digest.encode()), tuple(warnings))


def _check_signature(
    descriptor: ProtocolStubDescriptor,
    canonical: bytes,
    trust: TrustStore | None,
    signer_domain: str,
    url: str | None,
) -> str:
    assert descriptor.signature is not None
    ident, signature = parse_signature(descriptor.signature, url=url)
    if trust is None or not trust.is_trusted(signer_domain, ident):
        pinned = trust.key_ids(signer_domain) if trust else []
        raise CatalogueError(
            E_UNTRUSTED,
            f"signed by key {ident}, which the trust store does not pin for {signer_domain} "
            f"(pinned: {', '.join(pinned) or 'none'})",
            url=url,
        )
    if not trust.verify(signer_domain, ident, signature, canonical):
        raise CatalogueError(
            E_SIGNATURE, f"signature by key {ident} of {signer_domain} does not verify over the descriptor", url=url
        )
    if descriptor.publisher is not None and descriptor.publisher != signer_domain:
        raise CatalogueError(
            E_UNTRUSTED,
            f"descriptor was published by {descriptor.publisher}, expected a stub published by {signer_domain}",
            url=url,
        )
    return ident


def _name_mismatch(descriptor: ProtocolStubDescriptor, requested: str | None) -> str | None:
    # ``default`` is an alias a catalogue resolves to any of its stubs.
    if requested is None or requested == "default" or requested == descriptor.object_name:
        return None
    return f"descriptor names stub {descriptor.object_name!r} but was served as {requested!r}"


def check_signer_still_trusted(
    signer: str | None, *, trust: TrustStore | None, policy: str, signer_domain: str, url: str | None = None
) -> None:
    """Before a cached stub is reused: the policy and trust store of *now* must still accept its signer."""
    if policy == "off":
        return
    if signer is None:
        if policy == "require":
            raise CatalogueError(E_UNSIGNED, "cached stub is unsigned and the policy is 'require'", url=url)
        return
    if trust is None or not trust.is_trusted(signer_domain, signer):
        raise CatalogueError(
            E_UNTRUSTED, f"cached stub was signed by key {signer}, no longer pinned for {signer_domain}", url=url
        )


def check_update(
    *,
    cached_version: str,
    cached_digest: str,
    new_version: str,
    new_digest: str,
    what: str,
    url: str | None = None,
) -> None:
    """Refuse a rollback and a silent change of bytes under an unchanged version."""
    order = compare_versions(new_version, cached_version)
    if order < 0:
        raise CatalogueError(
            E_ROLLBACK,
            f"{what}: the catalogue offers version {new_version or '(none)'}, older than the cached "
            f"{cached_version or '(none)'}; run 'protofly catalogue forget' to accept it",
            url=url,
        )
    if order == 0 and new_digest != cached_digest:
        raise CatalogueError(
            E_CHANGED,
            f"{what}: publisher changed bytes under the same version {new_version or '(none)'}; "
            "run 'protofly catalogue forget' to accept the new bytes",
            url=url,
        )
