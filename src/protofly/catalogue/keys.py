"""Ed25519 publishing keys and the trust store that pins them per domain.

reTHINK signs nothing; protofly's catalogue does (``docs/catalogue.md``).  A publishing domain holds a
private key (PKCS#8 PEM, mode 0600) and hands out its public key record; a runtime pins public keys per
domain in a trust store file, so a stub for ``b.test`` is accepted only if a key pinned for ``b.test``
signed it.  Key ids are short and derived (first 16 hex digits of sha256 of the raw public key), so a
signature names its key without a directory of keys.

File formats (all JSON, UTF-8):

* public key record ``<domain>.pub.json``: ``{"domain": "b.test", "algorithm": "ed25519",
  "key_id": "…16 hex…", "public_key": "<base64 of the 32 raw bytes>"}``
* trust store: ``{"domains": {"b.test": ["ed25519:<base64>", ...], ...}}`` (the ``ed25519:`` prefix is
  optional on input and always written)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protofly.address import AddressError, validate_domain

__all__ = [
    "KeyFileError",
    "SigningKey",
    "TrustStore",
    "generate_keypair",
    "key_id",
    "load_public_record",
    "parse_public_key",
]

ALGORITHM = "ed25519"


class KeyFileError(ValueError):
    """A key or trust store file that cannot be used; the text names the file and the problem."""


def key_id(public_raw: bytes) -> str:
    """First 16 hex digits of sha256(raw public key): what a signature names."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def parse_public_key(text: str, *, where: str = "public key") -> bytes:
    """``ed25519:<base64>`` or bare base64 → the 32 raw bytes."""
    if not isinstance(text, str):
        raise KeyFileError(f"{where}: expected a string, got {type(text).__name__}")
    body = text.removeprefix(f"{ALGORITHM}:")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: {text[:60]!r} is not base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return raw


def _public_text(raw: bytes) -> str:
    return f"{ALGORITHM}:{base64.b64encode(raw).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A domain's private Ed25519 key."""

    private: Ed25519PrivateKey = field(repr=False)
    domain: str | None = None

    @classmethod
    def generate(cls, domain: str | None = None) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), validate_domain(domain) if domain else None)

    @classmethod
    def load(cls, path: Path, domain: str | None = None) -> SigningKey:
        """Read a PKCS#8 PEM private key (as written by :meth:`save` or ``openssl genpkey``)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read private key: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        return cls(key, validate_domain(domain) if domain else None)

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    @property
    def public_text(self) -> str:
        return _public_text(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def public_record(self, domain: str | None = None) -> dict[str, str]:
        owner = domain or self.domain
        if not owner:
            raise KeyFileError("a public key record needs the domain that owns the key")
        return {
            "domain": validate_domain(owner),
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_raw).decode("ascii"),
        }

    def save(self, path: Path) -> None:
        """Write the private key as PEM with mode 0600; never overwrites an existing file."""
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{path}: exists; refusing to overwrite a private key") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)


def generate_keypair(out_dir: Path, domain: str) -> tuple[Path, Path]:
    """Write ``<domain>.key`` (0600) and ``<domain>.pub.json`` into ``out_dir``; return both paths."""
    domain = validate_domain(domain)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate(domain)
    private_path = out_dir / f"{domain}.key"
    public_path = out_dir / f"{domain}.pub.json"
    if public_path.exists():
        raise KeyFileError(f"{public_path}: exists; refusing to overwrite")
    key.save(private_path)
    public_path.write_text(json.dumps(key.public_record(), indent=2) + "\n", encoding="utf-8")
    return private_path, public_path


def load_public_record(path: Path) -> tuple[str, bytes]:
    """Read a ``<domain>.pub.json`` record → ``(domain, raw public key)``; checks the key id."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise KeyFileError(f"{path}: expected a JSON object")
    if record.get("algorithm", ALGORITHM) != ALGORITHM:
        raise KeyFileError(f"{path}: algorithm {record.get('algorithm')!r} is not {ALGORITHM}")
    try:
        domain = validate_domain(record.get("domain", ""))
    except AddressError as exc:
        raise KeyFileError(f"{path}: domain: {exc}") from None
    raw = parse_public_key(record.get("public_key", ""), where=f"{path}: public_key")
    if "key_id" in record and record["key_id"] != key_id(raw):
        raise KeyFileError(f"{path}: key_id {record['key_id']!r} does not match the key ({key_id(raw)})")
    return domain, raw


class TrustStore:
    """Public keys pinned per domain; the only place a signature's key is looked up."""

    def __init__(self, pins: Mapping[str, Iterable[str | bytes]] | None = None) -> None:
        self._keys: dict[str, dict[str, Ed25519PublicKey]] = {}
        self._raw: dict[str, dict[str, bytes]] = {}
        for domain, keys in (pins or {}).items():
            for key in keys:
                self.add(domain, key)

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        try:
            data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyFileError(f"{path}: trust store file not found") from None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read trust store: {exc.strerror}") from None
        except ValueError as exc:
            raise KeyFileError(f"{path}: trust store is not JSON ({exc})") from None
        domains = data.get("domains") if isinstance(data, dict) else None
        if not isinstance(domains, dict):
            raise KeyFileError(f'{path}: expected {{"domains": {{"<domain>": ["ed25519:<base64>", ...]}}}}')
        store = cls()
        for domain, keys in domains.items():
            if not isinstance(keys, list):
                raise KeyFileError(f"{path}: domains.{domain}: expected a list of public keys")
            for index, key in enumerate(keys):
                store.add(domain, key, where=f"{path}: domains.{domain}[{index}]")
        return store

    def add(self, domain: str, public_key: str | bytes, *, where: str = "public key") -> str:
        """Pin ``public_key`` (raw bytes or ``ed25519:<base64>``) for ``domain``; return its key id."""
        try:
            domain = validate_domain(domain)
        except AddressError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        raw = public_key if isinstance(public_key, bytes) else parse_public_key(public_key, where=where)
        if len(raw) != 32:
            raise KeyFileError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
        ident = key_id(raw)
        self._keys.setdefault(domain, {})[ident] = Ed25519PublicKey.from_public_bytes(raw)
        self._raw.setdefault(domain, {})[ident] = raw
        return ident

    def lookup(self, domain: str, ident: str) -> Ed25519PublicKey | None:
        return self._keys.get(domain, {}).get(ident)

    def key_ids(self, domain: str) -> list[str]:
        return sorted(self._keys.get(domain, {}))

    def is_trusted(self, domain: str, ident: str) -> bool:
        return ident in self._keys.get(domain, {})

    def domains(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, domain: str, ident: str, signature: bytes, data: bytes) -> bool:
        key = self.lookup(domain, ident)
        if key is None:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def as_json(self) -> dict[str, Any]:
        return {"domains": {d: [_public_text(raw) for raw in keys.values()] for d, keys in sorted(self._raw.items())}}

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename) so a reader never sees half a trust store."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
