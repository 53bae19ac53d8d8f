"""Runtime configuration: one dataclass with documented defaults, loadable from TOML and the environment.

A TOML file may group settings in tables (``[sandbox]``, ``[restart]``, ...) for readability; the table
names are only grouping, every key is a field of :class:`RuntimeConfig`.  The catalogue resolver map is
the one nested value: ``[catalogues]`` maps a domain to the base URL that serves its catalogue.

Environment variables override the file: ``PROTOFLY_<FIELD>`` (e.g. ``PROTOFLY_DEPLOY_TIMEOUT=5``,
``PROTOFLY_CATALOGUES='{"b.test": "http://127.0.0.1:8081"}'``).  Every value is checked, and a bad one is
reported with its name and where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protofly import address

__all__ = ["ConfigError", "RuntimeConfig"]

ENV_PREFIX = "PROTOFLY_"
POLICIES = ("require", "warn", "off")
SANDBOXES = ("process", "in-process")


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range; the text names it."""


@dataclass
class RuntimeConfig:
    """Everything a :class:`protofly.Runtime` needs; only ``domain`` has no default."""

    #: The runtime's home domain: its runtime URL is ``hyperty-runtime://<domain>/<id>``.
    domain: str
    #: Where the runtime URL, stub counters and the catalogue cache live; None = nothing persisted.
    state_dir: Path | None = None
    #: Resolver map: domain → base URL of its catalogue (both layouts are looked up under it).
    catalogues: dict[str, str] = field(default_factory=dict)
    #: Trust store file pinning publishers' public keys per domain.
    trust_store: Path | None = None
    #: Signature policy: ``require`` (default), ``warn`` (accept unsigned reTHINK stubs loudly) or ``off``.
    policy: str = "require"
    #: Allow plain ``http://`` catalogues, on loopback addresses only (tests, the demo).
    allow_http_loopback: bool = False
    #: Contact no catalogue but those in ``catalogues`` (no DNS look-up of ``catalogue.<domain>``):
    #: for closed networks, tests and the demo.
    resolver_only: bool = False
    #: ``process`` (one OS process per stub, the default) or ``in-process`` (trusted code only).
    sandbox: str = "process"
    #: Modules each pre-started sandbox host imports while idle, so deploying a stub that uses them is fast.
    sandbox_preload: list[str] = field(default_factory=lambda: ["websockets.asyncio.client"])
    #: Per-stub limits; a descriptor may ask for less, never more.
    memory_mb: int = 1024
    cpu_seconds: int = 3600
    open_files: int = 256
    #: Seconds from trigger until the stub must be ``live``.
    deploy_timeout: float = 15.0
    #: Default wait for a response on the bus.
    request_timeout: float = 10.0
    #: Messages held per domain while its stub deploys or restarts.
    queue_limit: int = 1000
    #: Restart backoff after a crash: full jitter in [0, min(cap, base * 2**n)] seconds.
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    #: More than ``crash_budget`` crashes within ``crash_window`` seconds: the stub stays failed.
    crash_budget: int = 5
    crash_window: float = 300.0
    #: Live this long after a restart and the crash backoff starts again from its base.
    stable_after: float = 60.0
    #: Seconds a stub gets to disconnect before its process is terminated.
    remove_grace: float = 2.0
    #: Credentials per domain (JSON or TOML); see protofly.identity.
    credentials_file: Path | None = None
    #: Largest message accepted from a stub or a socket.
    max_message_size: int = 1 << 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        try:
            self.domain = address.validate_domain(self.domain)
        except address.AddressError as exc:
            raise ConfigError(f"domain: {exc}") from None
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.sandbox not in SANDBOXES:
            raise ConfigError(f"sandbox: must be one of {', '.join(SANDBOXES)}, got {self.sandbox!r}")
        for name in ("memory_mb", "cpu_seconds", "open_files", "queue_limit", "crash_budget", "max_message_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("deploy_timeout", "request_timeout", "backoff_cap", "crash_window", "remove_grace"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.backoff_base < 0 or self.stable_after < 0:
            raise ConfigError("backoff_base and stable_after must not be negative")
        for domain, base in self.catalogues.items():
            try:
                address.validate_domain(domain)
            except address.AddressError as exc:
                raise ConfigError(f"catalogues: {exc}") from None
            if not isinstance(base, str) or not base.startswith(("http://", "https://")):
                raise ConfigError(f"catalogues: base URL for {domain} must start with http:// or https://")

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "configuration") -> RuntimeConfig:
        """Build from plain data (a parsed TOML file); tables are flattened, unknown keys are errors."""
        flat = _flatten(data, origin)
        return cls(**{name: _coerce(name, value, origin) for name, value in flat.items()})

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> RuntimeConfig:
        """File (if any), then ``PROTOFLY_*`` environment variables, then explicit keyword overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = _flatten(tomllib.loads(Path(path).read_text(encoding="utf-8")), str(path))
            except OSError as exc:
                raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        env = os.environ if environ is None else environ
        for name in _field_names():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                data[name] = _parse_env(name, raw)
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "domain" not in data:
            raise ConfigError("domain: missing (set it in the file, with PROTOFLY_DOMAIN, or on the command line)")
        return cls(**{name: _coerce(name, value, "configuration") for name, value in data.items()})

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RuntimeConfig)]


def _flatten(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    known = set(_field_names())
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "catalogues":
            flat.update(_flatten(value, origin))
        elif key in known:
            flat[key] = value
        else:
            raise ConfigError(f"{origin}: unknown setting {key!r}")
    return flat


def _parse_env(name: str, raw: str) -> Any:
    if name == "catalogues":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"{ENV_PREFIX}CATALOGUES must be a JSON object of domain → base URL") from None
    return raw


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(RuntimeConfig)}[name]
    try:
        if kind in ("int",):
            return int(value)
        if kind in ("float",):
            return float(value)
        if kind in ("bool",):
            return _boolean(value)
        if kind.startswith("Path"):
            return None if value in (None, "") else Path(value).expanduser()
        if kind.startswith("list"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                raise TypeError("expected a list of module names")
            return [str(item).strip() for item in items if str(item).strip()]
        if kind.startswith("dict"):
            if not isinstance(value, Mapping):
                raise TypeError("expected a table of domain = base URL")
            return {str(k).lower(): v for k, v in value.items()}
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {name}: {exc}") from None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")
