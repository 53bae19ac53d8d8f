"""The kernel's cgroup filesystem: where the hierarchies are mounted, which groups this process is in, the
runtime's group name, and reading and writing the pseudo-files.

What :mod:`~protofly.sandbox.cgroup` builds its model on, kept apart so that the model reads as what a
stub's group is and does, not as file handling.  Files here are kernel pseudo-files: reading or writing
one does not block (a write to ``cgroup.procs`` may wait for an RCU grace period: the caller runs that one
in a thread).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
    "CgroupError",
    "clear_stale",
    "group_name",
    "ints",
    "keyed",
    "mounts",
    "number",
    "own_cgroups",
    "read",
    "write",
    "write_if_present",
]


class CgroupError(OSError):
    """A cgroup operation failed; the text says which file and why."""


def group_name() -> str:
    """The runtime's group, ``protofly-<pid>`` (below its own cgroup, in every hierarchy)."""
    return f"protofly-{os.getpid()}"


def clear_stale(parent: Path) -> None:
    """Remove ``protofly-<pid>`` groups of runtimes that are gone (they are empty: their hosts died too)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            name = entry.name
            if not name.startswith("protofly-") or not name[9:].isdigit() or name == group_name():
                continue
            if Path(f"/proc/{name[9:]}").exists():
                continue
            with contextlib.suppress(OSError):
                for child in entry.iterdir():
                    if child.is_dir():
                        child.rmdir()
                entry.rmdir()


def mounts() -> dict[str, Path]:
    """cgroup mounts from /proc/self/mountinfo: ``unified`` for cgroup2, each v1 controller by name."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue  # a bind of a sub-tree: its paths would not match /proc/self/cgroup
        kind, options = tail[0], tail[2].split(",")
        if kind == "cgroup2":
            found.setdefault("unified", Path(fields[4]))
        elif kind == "cgroup":
            for option in options:
                if option in ("memory", "pids", "cpuacct"):
                    found.setdefault(option, Path(fields[4]))
    return found


def own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under ``""`` its v2 cgroup."""
    found: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


# -- pseudo-files --------------------------------------------------------------------------------------------


def write(path: Path, value: int | str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(exc.errno, f"{path}: {exc.strerror}") from None
    try:
        os.write(fd, str(value).encode())
    except OSError as exc:
        raise CgroupError(exc.errno, f"writing {value} to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def write_if_present(path: Path, value: int | str) -> None:
    if path.exists():
        write(path, value)


def read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def ints(path: Path) -> list[int]:
    return [int(x) for x in read(path).split()]


def number(path: Path) -> int | None:
    text = read(path).strip()
    return int(text) if text.isdigit() else None


def keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (memory.events, pids.events, memory.oom_control, cpu.stat)."""
    values: dict[str, int] = {}
    for line in read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values
