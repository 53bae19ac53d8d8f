"""Resource limits of a stub process: one model from the descriptor's ``sandbox`` field to the rlimits.

Two values, one vocabulary:

* :class:`SandboxLimits` is what a stub *asks* for (its descriptor's ``sandbox`` field, every limit
  optional).  The catalogue decodes the field into it with :meth:`SandboxLimits.from_wire`, so a
  spelling the sandbox does not know can never be silently dropped between the two.
* :class:`Limits` is what a stub process *gets*: the runtime's limits, :meth:`Limits.narrowed` by the
  request (a stub may ask for less, never more).  It travels to the sandbox host in the ``create``
  message (:meth:`Limits.as_dict`, :meth:`Limits.from_dict`) and becomes the rlimits there.

Kept free of anything heavier than ``dataclasses``: the sandbox host imports it in every stub process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["DEFAULT_LIMITS", "LIMIT_KEYS", "LIMIT_RANGE", "LimitError", "Limits", "SandboxLimits"]

#: Every accepted spelling of a limit → its attribute.  ``memoryMB`` is how reTHINK and protofly
#: descriptors write it; ``memoryMb`` and the attribute names themselves have always been accepted too.
LIMIT_KEYS: Mapping[str, str] = {
    "memoryMB": "memory_mb",
    "memoryMb": "memory_mb",
    "memory_mb": "memory_mb",
    "cpuSeconds": "cpu_seconds",
    "cpu_seconds": "cpu_seconds",
    "openFiles": "open_files",
    "open_files": "open_files",
    "processes": "processes",
}

#: The descriptor spelling of each attribute (what a summary or a published descriptor shows).
_WIRE_NAMES = {
    "memory_mb": "memoryMB",
    "cpu_seconds": "cpuSeconds",
    "open_files": "openFiles",
    "processes": "processes",
}

#: Largest value of each limit a descriptor may name (1 TiB of memory, 2^31 CPU seconds, 2^20 files and
#: 2^16 processes).
LIMIT_RANGE: Mapping[str, int] = {
    "memory_mb": 1 << 20,
    "cpu_seconds": 1 << 31,
    "open_files": 1 << 20,
    "processes": 1 << 16,
}


class LimitError(ValueError):
    """A limit that is unknown or not a positive integer in range.

    ``field`` names it as the descriptor spells it (``sandbox.memoryMB``; ``sandbox`` for the object
    itself) and ``problem`` says what is wrong, so the catalogue can report it as a descriptor error.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.field = f"sandbox.{key}" if key else "sandbox"
        self.problem = problem
        super().__init__(f"{self.field}: {problem}")


def _check(key: str, name: str, value: object) -> int:
    """``value`` as a limit, or :class:`LimitError` naming ``key`` (booleans are not numbers here)."""
    if type(value) is not int:
        raise LimitError(key, f"expected a positive integer, got {_kind(value)}")
    if not 0 < value <= LIMIT_RANGE[name]:
        raise LimitError(key, f"{value} is out of range 1..{LIMIT_RANGE[name]}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits a stub asks for; each may only *lower* the runtime's own (see :meth:`Limits.narrowed`).

    ``None`` means "no request".  Construction checks every value, so an instance always holds limits
    that can be applied.
    """

    memory_mb: int | None = None  # RLIMIT_AS and the cgroup's memory limit, MiB
    cpu_seconds: int | None = None  # RLIMIT_CPU
    open_files: int | None = None  # RLIMIT_NOFILE
    processes: int | None = None  # the cgroup's pids limit (processes and threads of the whole tree)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                _check(field.name, field.name, value)

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> SandboxLimits:
        """Decode a descriptor's ``sandbox`` object (any spelling in :data:`LIMIT_KEYS`).

        An unknown key is a :class:`LimitError`: a misspelt limit must not quietly leave the stub with
        more than its publisher meant it to have.  Two spellings of one limit give the lower value.
        """
        if not isinstance(value, Mapping):
            raise LimitError("", f"expected an object, got {_kind(value)}")
        found: dict[str, int] = {}
        for key, item in value.items():
            name = LIMIT_KEYS.get(key)
            if name is None:
                raise LimitError(key, f"unknown limit (known: {', '.join(_WIRE_NAMES.values())})")
            number = _check(key, name, item)
            found[name] = min(number, found.get(name, number))
        return cls(**found)

    def as_wire(self) -> dict[str, int]:
        """The request as a descriptor writes it (``memoryMB``, ...), without the limits not asked for."""
        return {wire: getattr(self, name) for name, wire in _WIRE_NAMES.items() if getattr(self, name) is not None}


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one stub process, as applied (every limit set).

    ``cpu_seconds`` is RLIMIT_CPU: *cumulative* CPU time over the process's life, not a rate.  A long-lived
    stub that keeps using CPU eventually reaches it, is stopped with SIGXCPU and reported ``failed``
    ("CPU limit exceeded (SIGXCPU)"); the Runtime UA then restarts it like any crash, with a fresh budget.
    Pick the default so that this happens only to runaway stubs (an hour of CPU by default).
    """

    memory_mb: int  # RLIMIT_AS of each process, and the memory limit of the stub's cgroup (its whole tree)
    cpu_seconds: int  # RLIMIT_CPU
    open_files: int  # RLIMIT_NOFILE
    processes: int = 64  # pids limit of the stub's cgroup: processes and threads of the whole tree

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limits.{field.name}: must be a positive integer, got {value!r}")

    def narrowed(self, requested: SandboxLimits | None) -> Limits:
        """These limits lowered by a stub's request: ``min`` per field.

        A request above the current value is ignored (a stub may ask for less, never more).
        """
        if requested is None:
            return self
        if not isinstance(requested, SandboxLimits):
            raise TypeError(f"requested must be SandboxLimits or None, got {type(requested).__name__}")
        changes = {
            field.name: value
            for field in fields(self)
            if (value := getattr(requested, field.name)) is not None and value < getattr(self, field.name)
        }
        return replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, int]:
        """The ``sandbox`` body of the host's ``create`` message (and the isolation record's ``rlimits``)."""
        return {
            "memory_mb": self.memory_mb,
            "cpu_seconds": self.cpu_seconds,
            "open_files": self.open_files,
            "processes": self.processes,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Limits:
        """The inverse of :meth:`as_dict`; ``ValueError`` naming the field when one is missing or bad."""
        if not isinstance(value, Mapping):
            raise ValueError(f"limits must be an object, got {_kind(value)}")
        names = [field.name for field in fields(cls)]
        extra = sorted(set(value) - set(names))
        if extra:
            raise ValueError(f"limits.{extra[0]}: unknown limit")

        def need(name: str) -> int:
            item = value.get(name)
            if type(item) is not int or item < 1:
                raise ValueError(f"limits.{name}: must be a positive integer, got {item!r}")
            return item

        return cls(
            memory_mb=need("memory_mb"),
            cpu_seconds=need("cpu_seconds"),
            open_files=need("open_files"),
            processes=need("processes"),
        )


#: Defaults for a runtime that configures nothing: 512 MiB, one hour of CPU, 256 files, 64 processes.
DEFAULT_LIMITS = Limits(memory_mb=512, cpu_seconds=3600, open_files=256, processes=64)
