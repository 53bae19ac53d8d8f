"""Runtime configuration: one typed struct with documented defaults, loadable from TOML and the environment.

:class:`RuntimeConfig` is a ``msgspec.Struct`` whose annotations carry the constraints (``Meta(ge=1)``,
literal choices), so that loading a file, the environment or keyword arguments validates while decoding,
and building one in code checks the same annotations: the constraints live in one place.

A TOML file may group settings in tables (``[sandbox]``, ``[restart]``, ...) for readability; the table
names are only grouping, every key is a field of :class:`RuntimeConfig`.  Two values are maps:
``[catalogues]`` maps a domain to the base URL that serves its catalogue, and ``[hosts]`` maps a host
name to the IP address the runtime connects to when a stub asks for an endpoint on that host.

Environment variables override the file: ``PROTOFLY_<FIELD>`` (e.g. ``PROTOFLY_DEPLOY_TIMEOUT=5``,
``PROTOFLY_CATALOGUES='{"b.test": "http://127.0.0.1:8081"}'``).  Every value is checked, and a bad one is
reported with its name and where it came from.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from protofly import address

__all__ = ["ConfigError", "RuntimeConfig", "parse_listen_address"]

ENV_PREFIX = "PROTOFLY_"
POLICIES = ("require", "warn", "off")
SANDBOXES = ("process", "in-process")

AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NotNegative = Annotated[float, msgspec.Meta(ge=0)]


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range; the text names it."""


class RuntimeConfig(msgspec.Struct, kw_only=True):
    """Everything a :class:`protofly.Runtime` needs; only ``domain`` has no default."""

    #: The runtime's home domain: its runtime URL is ``hyperty-runtime://<domain>/<id>``.
    domain: str
    #: Where the runtime URL, stub counters and the catalogue cache live; None = nothing persisted.
    state_dir: Path | None = None
    #: Resolver map: domain → base URL of its catalogue (both layouts are looked up under it).
    catalogues: dict[str, str] = {}
    #: Trust store file pinning publishers' public keys per domain.
    trust_store: Path | None = None
    #: Signature policy: ``require`` (default), ``warn`` (accept unsigned reTHINK stubs loudly) or ``off``.
    policy: Literal["require", "warn", "off"] = "require"
    #: Allow plain ``http://`` catalogues, on loopback addresses only (tests, the demo).
    allow_http_loopback: bool = False
    #: Contact no catalogue but those in ``catalogues`` (no DNS look-up of ``catalogue.<domain>``):
    #: for closed networks, tests and the demo.
    resolver_only: bool = False
    #: Resolver map for the stubs' connections (their descriptor's ``egress``): host name → IP address.
    #: Looked up before DNS; with ``resolver_only`` a host not in it is refused (tests, the demo, closed networks).
    hosts: dict[str, str] = {}
    #: Seconds the runtime gives one connection it opens for a stub (resolution included).
    egress_connect_timeout: Positive = 5.0
    #: ``process`` (one OS process per stub, the default) or ``in-process`` (trusted code only).
    sandbox: Literal["process", "in-process"] = "process"
    #: Modules each pre-started sandbox host imports while idle, so deploying a stub that uses them is fast.
    sandbox_preload: list[str] = msgspec.field(
        default_factory=lambda: ["websockets.asyncio.client", "protofly.backoff"]
    )
    #: Per-stub limits; a descriptor may ask for less, never more.
    memory_mb: AtLeastOne = 1024
    cpu_seconds: AtLeastOne = 3600
    open_files: AtLeastOne = 256
    #: Processes and threads a stub's whole process tree may have (its cgroup's pids limit).
    processes: AtLeastOne = 64
    #: Size of a stub's private ``/tmp`` (a tmpfs; its pages also count towards the stub's memory limit).
    tmp_mb: AtLeastOne = 64
    #: Control groups per stub (memory, pids, CPU accounting): ``auto`` uses them where the machine offers
    #: a writable cgroup v2 subtree or cgroup v1 ``memory`` + ``pids`` (and reports them missing otherwise),
    #: ``require`` refuses to start without them, ``off`` does without (reported as missing).
    cgroups: Literal["auto", "require", "off"] = "auto"
    #: Where the runtime's cgroup goes, relative to each hierarchy's root (e.g. ``/protofly``); empty: below
    #: the runtime's own cgroup (a delegated subtree).
    cgroup_parent: str = ""
    #: The host user a runtime started as root runs its stubs as (a name or a number); empty: keep root
    #: (reported as a missing layer).  A runtime started as a normal user runs them as itself.
    sandbox_user: str = "nobody"
    #: Seconds from trigger until the stub must be ``live``.
    deploy_timeout: Positive = 15.0
    #: Default wait for a response on the bus.
    request_timeout: Positive = 10.0
    #: Messages held per domain while its stub deploys or restarts.
    queue_limit: AtLeastOne = 1000
    #: Restart backoff after a crash: full jitter in [0, min(cap, base * 2**n)] seconds.
    backoff_base: NotNegative = 0.25
    backoff_cap: Positive = 30.0
    #: ``crash_budget`` crashes within ``crash_window`` seconds (a failed restart counts): the stub stays failed.
    crash_budget: AtLeastOne = 5
    crash_window: Positive = 300.0
    #: Live this long after a restart and the crash backoff starts again from its base.
    stable_after: NotNegative = 60.0
    #: Seconds a stub gets to disconnect before its process is terminated.
    remove_grace: Positive = 2.0
    #: Credentials per domain (JSON or TOML); see protofly.identity.
    credentials_file: Path | None = None
    #: Per stub: status updates and other messages the runtime accepts per second (token buckets; the
    #: excess is dropped and counted, a dropped request answered with 429).
    stub_status_rate: Positive = 50.0
    stub_status_burst: Annotated[float, msgspec.Meta(ge=1)] = 100.0
    stub_message_rate: Positive = 200_000.0
    stub_message_burst: Annotated[float, msgspec.Meta(ge=1)] = 50_000.0
    #: Bounds on deployments that local code triggers: stub records, deployments at once, and seconds a
    #: domain whose stub failed (and was evicted) is answered from a negative cache.
    max_stubs: AtLeastOne = 64
    max_concurrent_deploys: AtLeastOne = 8
    negative_ttl: Positive = 30.0
    #: Largest message accepted from a stub or a socket (also the sandbox channel's frame limit, which must
    #: carry a stub's source: hence the 64 KiB floor).
    max_message_size: Annotated[int, msgspec.Meta(ge=64 << 10)] = 1 << 20

    #: Liveness: every ``ping_interval`` seconds the runtime pings each live stub's sandbox host; the answer
    #: comes from the stub's event loop, so a loop that is blocked (a busy loop, a deadlock) cannot give it.
    #: No answer within ``ping_timeout`` and the stub is ``failed: unresponsive`` (killed, then restarted
    #: under backoff): detected at most ``ping_interval + ping_timeout`` seconds after it blocked.
    ping_interval: Positive = 10.0
    ping_timeout: Positive = 10.0
    #: A ``live`` status expires (shown as ``expired``) unless refreshed within this many seconds: by the stub
    #: publishing ``live`` again, or by the SDK answering a ping while its connection is live.
    status_ttl: Positive = 240.0
    #: The shorter time to live of a ``live`` that follows a failure or a disconnection (until refreshed).
    status_ttl_after_error: Positive = 60.0
    #: ``HOST:PORT`` of the Prometheus ``/metrics`` and ``/healthz``/``/readyz`` listener; None = off.
    metrics_address: str | None = None
    #: ``HOST:PORT`` of the read-only web console; None = off.  Both bind where told (loopback by default
    #: on the command line); a non-loopback address is logged as a warning.
    console_address: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the annotations' constraints (also for a struct built in code) and the cross-field rules."""
        for name, problem in _constraint_violations(self):
            raise ConfigError(f"{name}: {problem}")
        try:
            self.domain = address.validate_domain(self.domain)
        except address.AddressError as exc:
            raise ConfigError(f"domain: {exc}") from None
        if self.backoff_cap < self.backoff_base:
            raise ConfigError(f"backoff_cap: must not be below backoff_base ({self.backoff_base:g})")
        normalized = {}
        for domain, base in self.catalogues.items():
            try:
                normalized[address.validate_domain(domain)] = base
            except address.AddressError as exc:
                raise ConfigError(f"catalogues: {exc}") from None
            if not isinstance(base, str) or not base.startswith(("http://", "https://")):
                raise ConfigError(f"catalogues: base URL for {domain} must start with http:// or https://")
        self.catalogues = normalized
        for name in ("metrics_address", "console_address"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_listen_address(value)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        self.hosts = _check_hosts(self.hosts)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "configuration") -> RuntimeConfig:
        """Build from plain data (a parsed TOML file); tables are flattened, unknown keys are errors."""
        return _convert(_flatten(data, origin), origin)

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
            except UnicodeDecodeError as exc:
                raise ConfigError(f"configuration file {path} is not UTF-8 (invalid byte at {exc.start})") from None
            except (ValueError, RecursionError) as exc:  # TOMLDecodeError, an integer of 5,000 digits, deep arrays
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise ConfigError(f"configuration file {path} is not valid TOML: {reason}") from None
        env = os.environ if environ is None else environ
        for name in _field_names():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                data[name] = _parse_env(name, raw)
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "domain" not in data:
            raise ConfigError("domain: missing (set it in the file, with PROTOFLY_DOMAIN, or on the command line)")
        return _convert(data, "configuration")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (paths as strings), for ``runtime info``."""
        plain: dict[str, Any] = msgspec.to_builtins(self, enc_hook=str)
        return {name: plain.get(name) for name in _field_names()}


def parse_listen_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` → (host, port); a bare port is on loopback (127.0.0.1).

    ValueError naming the problem.
    """
    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port!r}")
    return host, int(port)


def _check_hosts(hosts: Mapping[str, Any]) -> dict[str, str]:
    """Host names (lower-cased) to IP address literals; a bad entry is a :class:`ConfigError` naming it."""
    checked: dict[str, str] = {}
    for name, value in hosts.items():
        host = str(name).lower().removesuffix(".")
        try:
            address.validate_domain(host)
        except address.AddressError as exc:
            raise ConfigError(f"hosts: {exc}") from None
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            checked[host] = str(ipaddress.ip_address(value))
        except ValueError:
            raise ConfigError(f"hosts: {name} must map to an IP address, got {value!r}") from None
    return checked


def _field_names() -> tuple[str, ...]:
    return RuntimeConfig.__struct_fields__


def _constraint_violations(config: RuntimeConfig) -> list[tuple[str, str]]:
    """The annotated bounds a struct built in code breaks (decoding checks them by itself)."""
    found = []
    info = msgspec.inspect.type_info(RuntimeConfig)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        kind = field.type
        value = getattr(config, field.name)
        if isinstance(kind, msgspec.inspect.LiteralType):
            if value not in kind.values:
                found.append((field.name, _not_a_choice(field.name, value)))
            continue
        if not isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            found.append((field.name, f"expected a number, got {_shown(value)}"))
        elif kind.ge is not None and value < kind.ge:
            found.append((field.name, f"must be at least {kind.ge}, got {_shown(value)}"))
        elif kind.gt is not None and value <= kind.gt:
            found.append((field.name, f"must be positive, got {_shown(value)}"))
    return found


def _convert(data: Mapping[str, Any], origin: str) -> RuntimeConfig:
    """Decode plain data (TOML, environment strings) into the struct, validating as it goes."""
    cleaned = {name: _prepare(name, value) for name, value in data.items()}
    try:
        return msgspec.convert(cleaned, RuntimeConfig, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        text = str(exc)
        detail, sep, where = text.rpartition(" - at `$.")
        if sep:
            name = where.rstrip("`").split(".")[0].split("[")[0]
            if name in _CHOICES:
                detail = _not_a_choice(name, cleaned.get(name))
            raise ConfigError(f"{origin}: {name}: {detail}") from None
        raise ConfigError(f"{origin}: {text}") from None


def _flatten(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    known = set(_field_names())
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key not in _MAPS:
            flat.update(_flatten(value, origin))
        elif key in known:
            flat[key] = value
        else:
            raise ConfigError(f"{origin}: unknown setting {key!r}")
    return flat


_MAPS = ("catalogues", "hosts")


def _parse_env(name: str, raw: str) -> Any:
    if name in _MAPS:
        what = "domain → base URL" if name == "catalogues" else "host name → IP address"
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, 5,000-digit integers, deep nesting
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be a JSON object of {what}") from None
    return raw


_CHOICES = {"policy": POLICIES, "sandbox": SANDBOXES, "cgroups": ("auto", "require", "off")}


def _not_a_choice(name: str, value: Any) -> str:
    return f"must be one of {', '.join(_CHOICES[name])}, got {_shown(value)}"


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message: cut short, and safe for integers Python refuses to print."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer of more than 4,300 digits"
    return text if len(text) <= 80 else text[:77] + "..."


def _prepare(name: str, value: Any) -> Any:
    """Environment-string forms msgspec does not read by itself: comma lists, empty paths, yes/no."""
    if name == "sandbox_preload" and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if name in ("state_dir", "trust_store", "credentials_file", "metrics_address", "console_address") and value == "":
        return None
    if isinstance(value, str) and value.strip().lower() in _WORDS and name in _BOOLEANS:
        return _WORDS[value.strip().lower()]
    if name == "catalogues" and isinstance(value, Mapping):
        return {str(domain).lower(): base for domain, base in value.items()}
    return value


_WORDS = {"yes": True, "on": True, "no": False, "off": False}
_BOOLEANS = ("allow_http_loopback", "resolver_only")


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str | Path):
        return Path(value).expanduser()
    raise TypeError(f"expected a path, got {type(value).__name__}")  # msgspec turns it into ValidationError
