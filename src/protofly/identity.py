"""The Identity Module: credentials per domain, handed to a stub when it connects, and to nobody else.

Credentials come from a JSON or TOML file named in the configuration, or from the ``PROTOFLY_CREDENTIALS``
environment variable (a JSON object, or a path to such a file).  They are held in :class:`Secret` wrappers
whose ``repr`` and ``str`` say ``***``, so an accidental log call, exception message or status
description shows the placeholder, never the value.  Only :meth:`IdentityModule.credentials_for` unwraps
them, right before they cross into the stub's sandbox.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protofly import address

__all__ = ["ENV_VAR", "IdentityError", "IdentityModule", "Secret"]

ENV_VAR = "PROTOFLY_CREDENTIALS"


class IdentityError(Exception):
    """Credentials that cannot be loaded; the text names the file and the problem, never a value."""


class Secret:
    """A value that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def reveal(self) -> Any:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        # Consistent with ``__eq__``: equal values hash alike; an unhashable value (a dict) raises TypeError.
        return hash((Secret, self._value))


class IdentityModule:
    """Credentials by domain.  Empty by default: a stub that needs none gets ``None``."""

    def __init__(self, credentials: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._by_domain: dict[str, Secret] = {}
        for domain, value in (credentials or {}).items():
            self.set(domain, value)

    @classmethod
    def load(cls, path: Path | str | None = None, *, environ: Mapping[str, str] | None = None) -> IdentityModule:
        """From ``path`` if given, else from ``$PROTOFLY_CREDENTIALS`` (JSON text or a file path), else empty."""
        env = os.environ if environ is None else environ
        if path is not None:
            return cls(_read_file(Path(path)))
        raw = env.get(ENV_VAR, "").strip()
        if not raw:
            return cls()
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise IdentityError(f"${ENV_VAR} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
            return cls(_check_shape(data, f"${ENV_VAR}"))
        return cls(_read_file(Path(raw)))

    def set(self, domain: str, credentials: Mapping[str, Any]) -> None:
        if not isinstance(credentials, Mapping):
            raise IdentityError(f"credentials for {domain} must be an object of fields")
        self._by_domain[address.validate_domain(domain)] = Secret(dict(credentials))

    def has(self, domain: str) -> bool:
        return domain in self._by_domain

    def domains(self) -> list[str]:
        return sorted(self._by_domain)

    def credentials_for(self, domain: str) -> dict[str, Any] | None:
        """The plain credentials of ``domain``, for the stub's ``connect`` only."""
        secret = self._by_domain.get(domain)
        return None if secret is None else dict(secret.reveal())

    def __repr__(self) -> str:
        return f"IdentityModule(domains={self.domains()})"


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise IdentityError(f"cannot read credentials file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        # The parser's message can quote the offending text, which may be a secret: give the position only.
        where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "see the file"
        raise IdentityError(f"credentials file {path} is not valid {kind} ({where})") from None
    return _check_shape(data, str(path))


def _check_shape(data: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise IdentityError(f"{origin}: expected an object mapping domains to credential objects")
    for domain, value in data.items():
        if not isinstance(value, dict):
            raise IdentityError(f"{origin}: credentials for {domain!r} must be an object")
        try:
            address.validate_domain(domain)
        except address.AddressError as exc:
            raise IdentityError(f"{origin}: {exc}") from None
    return data
