"""A control group per stub: its whole process tree's memory, process count and CPU, limited and counted.

rlimits bind one process; a stub that forks, writes to a memfd or fills its private ``/tmp`` escapes them.
A cgroup holds every process of the stub's tree (children, grandchildren, whatever they leave in tmpfs and
memfds is charged to it), so one limit binds them all, the kernel's own counters say when a limit was hit,
and one write kills them all.

Two kernel interfaces, one model (:class:`StubCgroup`):

* **cgroup v2** where the runtime's own cgroup is a delegated subtree (systemd's ``Delegate=yes`` layout on
  a user's machine, or root): the runtime moves itself into a leaf ``runtime``, enables ``memory pids cpu``
  for its children and makes one child per host; limits are ``memory.max`` (and ``memory.swap.max 0``) and
  ``pids.max``; hits are ``memory.events`` ``oom_kill`` and ``pids.events`` ``max``; unload writes
  ``cgroup.kill``.
* **cgroup v1** ``memory`` + ``pids`` (+ ``cpuacct`` for CPU seconds) where that is what the machine offers
  (Debian hosts with the hybrid layout, as root): one directory per controller; limits are
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``) and ``pids.max``; hits are
  ``memory.oom_control`` ``oom_kill`` and ``pids.events`` ``max``; unload sets ``pids.max`` to 0 (no fork can
  succeed any more) and SIGKILLs every process listed in ``cgroup.procs`` until none is left.

:func:`probe` finds which one works here (once, at sandbox start) and creates the runtime's group,
``protofly-<pid>`` below the runtime's own cgroup (or below ``parent``); a machine without either is
reported with the reason, never skipped silently.  The files are kernel pseudo-files
(:mod:`~protofly.sandbox.cgroupfs`): reading or writing one does not block, so the few a deploy needs are
done on the event loop; a host's move into its group (an RCU grace period per hierarchy) is made when the
host starts as a spare, in a thread, and removal (which waits for the kernel to let go of the group) runs
in a thread too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protofly.sandbox import cgroupfs as fs
from protofly.sandbox.cgroupfs import CgroupError

__all__ = ["CgroupError", "CgroupTree", "Hit", "Limited", "StubCgroup", "Usage", "hierarchies", "members", "probe"]

#: v1 controllers a stub group needs (``cpuacct`` only adds CPU seconds to the accounting).
_V1_REQUIRED = ("memory", "pids")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
#: How long removal waits for the killed processes to leave the group.
_EMPTY_WAIT = 5.0
_HOST_NUMBERS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a stub's cgroup accounts for now (``None``: this kernel does not count it)."""

    memory_bytes: int | None
    memory_peak_bytes: int | None
    cpu_seconds: float | None
    processes: int | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "memory_bytes": self.memory_bytes,
            "memory_peak_bytes": self.memory_peak_bytes,
            "cpu_seconds": None if self.cpu_seconds is None else round(self.cpu_seconds, 3),
            "processes": self.processes,
        }


@dataclass(frozen=True, slots=True)
class Limited:
    """The kernel's counts of limit hits: OOM kills in the group, and forks refused by ``pids.max``."""

    oom_kills: int = 0
    forks_refused: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """A limit the kernel enforced on the tree: the failure reason, and the counter it is counted under."""

    reason: str
    counter: str  # ``memory_limit`` or ``process_limit``


@dataclass
class CgroupTree:
    """The runtime's group (the result of :func:`probe`): where each host's group is made."""

    version: int  # 1 or 2
    #: v1: controller → the runtime group's directory in that hierarchy; v2: ``{"unified": directory}``.
    dirs: dict[str, Path]
    #: The runtime group's path relative to the hierarchy root (for reports).
    path: str

    def new_group(self, memory_bytes: int, processes: int) -> StubCgroup:
        """A fresh, empty group for one host, with these limits already set."""
        name = f"h{next(_HOST_NUMBERS)}"  # unique in the process: two sandboxes share protofly-<pid>
        made: list[Path] = []
        try:
            for directory in self.dirs.values():
                directory.mkdir(exist_ok=True)  # another sandbox of this process may just have removed it
                child = directory / name
                child.mkdir()
                made.append(child)
            group = StubCgroup(self.version, {key: d / name for key, d in self.dirs.items()}, f"{self.path}/{name}")
            group.set_limits(memory_bytes, processes)
        except OSError as exc:
            for child in made:
                with contextlib.suppress(OSError):
                    child.rmdir()
            raise CgroupError(exc.errno, f"cannot create a stub cgroup in {self.path}: {exc}") from None
        return group

    def remove(self) -> None:
        """Remove the runtime's group (its host groups are gone by now; a leftover is logged by the caller)."""
        for directory in self.dirs.values():
            with contextlib.suppress(OSError):
                directory.rmdir()


class StubCgroup:
    """One host's group: placed before the host's code runs, limited at deploy, killed and removed at the end."""

    def __init__(self, version: int, dirs: dict[str, Path], path: str) -> None:
        self.version = version
        self.dirs = dirs
        self.path = path
        self.memory_bytes = 0
        self.processes = 0
        self._before = Limited()
        self._main = dirs["unified"] if version == 2 else dirs["pids"]

    # -- limits ------------------------------------------------------------------------------------

    def set_limits(self, memory_bytes: int, processes: int) -> None:
        """Write the memory and pids limits (lower only after the start: a deploy narrows a spare's)."""
        if self.version == 2:
            unified = self.dirs["unified"]
            fs.write(unified / "memory.max", memory_bytes)
            fs.write_if_present(unified / "memory.swap.max", 0)  # tmpfs pages must not escape to swap
            fs.write(unified / "pids.max", processes)
        else:
            memory = self.dirs["memory"]
            # RAM + swap gets the same bound; the kernel wants memsw >= memory at every step, so the order
            # depends on the direction (a spare starts unlimited, a deploy lowers).
            files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            if self.memory_bytes and memory_bytes > self.memory_bytes:
                files.reverse()
            for name in files:
                (fs.write if name == "memory.limit_in_bytes" else fs.write_if_present)(memory / name, memory_bytes)
            fs.write(self.dirs["pids"] / "pids.max", processes)
        self.memory_bytes = memory_bytes
        self.processes = processes

    # -- membership --------------------------------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move one process (all its threads) into the group, in every hierarchy."""
        for directory in self.dirs.values():
            fs.write(directory / "cgroup.procs", pid)

    def place_tree(self, root: int, descendants: Callable[[int], list[int]]) -> list[int]:
        """Move ``root`` and everything below it; a process forked after its parent moved is born inside.

        The kernel serialises forks against migrations, so a child either appears in its parent's
        ``children`` list before the parent moves (and is moved here) or is forked inside the group.
        """
        self.add(root)
        moved = [root]
        for pid in descendants(root):
            with contextlib.suppress(CgroupError):  # it exited meanwhile
                self.add(pid)
                moved.append(pid)
        return moved

    def pids(self) -> list[int]:
        """Every process in the group now (``cgroup.procs``)."""
        try:
            text = (self._main / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    # -- counters ----------------------------------------------------------------------------------

    def limited(self) -> Limited:
        """The kernel's counts of limit hits so far."""
        if self.version == 2:
            memory = fs.keyed(self.dirs["unified"] / "memory.events")
            pids = fs.keyed(self.dirs["unified"] / "pids.events")
        else:
            memory = fs.keyed(self.dirs["memory"] / "memory.oom_control")
            pids = fs.keyed(self.dirs["pids"] / "pids.events")
        return Limited(oom_kills=memory.get("oom_kill", 0), forks_refused=pids.get("max", 0))

    def arm(self) -> None:
        """Count limit hits from now on (a deploy: what a spare went through before is not the stub's)."""
        self._before = self.limited()

    def hit(self) -> Hit | None:
        """The limit the kernel enforced since :meth:`arm`, from its own counters (memory first), or None."""
        now, before = self.limited(), self._before
        if now.oom_kills > before.oom_kills:
            kills = now.oom_kills - before.oom_kills
            return Hit(f"memory limit (cgroup: {kills} OOM kill(s) at {self.memory_bytes >> 20} MiB)", "memory_limit")
        if now.forks_refused > before.forks_refused:
            refused = now.forks_refused - before.forks_refused
            tasks = self.usage().processes
            return Hit(
                f"process limit (cgroup: pids.max {self.processes} reached by {tasks} tasks, {refused} forks refused)",
                "process_limit",
            )
        return None

    def usage(self) -> Usage:
        """Memory now and at its peak, CPU seconds and processes, as the kernel accounts them."""
        if self.version == 2:
            unified = self.dirs["unified"]
            cpu = fs.keyed(unified / "cpu.stat").get("usage_usec")
            return Usage(
                memory_bytes=fs.number(unified / "memory.current"),
                memory_peak_bytes=fs.number(unified / "memory.peak"),
                cpu_seconds=None if cpu is None else cpu / 1e6,
                processes=fs.number(unified / "pids.current"),
            )
        cpuacct = self.dirs.get("cpuacct")
        nanoseconds = fs.number(cpuacct / "cpuacct.usage") if cpuacct is not None else None
        return Usage(
            memory_bytes=fs.number(self.dirs["memory"] / "memory.usage_in_bytes"),
            memory_peak_bytes=fs.number(self.dirs["memory"] / "memory.max_usage_in_bytes"),
            cpu_seconds=None if nanoseconds is None else nanoseconds / 1e9,
            processes=fs.number(self.dirs["pids"] / "pids.current"),
        )

    def report(self) -> dict[str, object]:
        """The isolation record's ``cgroup`` value."""
        return {
            "version": self.version,
            "path": self.path,
            "memory_max_mb": self.memory_bytes >> 20,
            "pids_max": self.processes,
            "controllers": sorted(self.dirs) if self.version == 1 else list(_V2_CONTROLLERS),
        }

    # -- the end -----------------------------------------------------------------------------------

    def kill(self) -> list[int]:
        """SIGKILL every process in the group, so that none can fork past it; returns the pids it saw."""
        seen = self.pids()
        if self.version == 2 and (self._main / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                fs.write(self._main / "cgroup.kill", 1)
                return seen
        with contextlib.suppress(OSError):
            fs.write(self.dirs["unified" if self.version == 2 else "pids"] / "pids.max", 0)  # no more forks
        for _ in range(100):
            current = self.pids()
            if not current:
                break
            seen.extend(pid for pid in current if pid not in seen)
            for pid in current:
                self._kill_member(pid)
        return seen

    def _kill_member(self, pid: int) -> None:
        """SIGKILL ``pid`` through a pidfd, after checking (on the pidfd's process) that it is still ours."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if self._contains(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _contains(self, pid: int) -> bool:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        suffix = "/" + "/".join(self._main.parts[-2:])  # protofly-<runtime pid>/h<n>, in every hierarchy
        return any(line.rstrip().endswith(suffix) for line in text.splitlines())

    def remove(self, timeout: float = _EMPTY_WAIT) -> list[int]:
        """Kill what is left, wait until the group is empty, then remove it (blocking: run in a thread).

        Returns the pids that were still in the group when removal started (the caller logs them).
        """
        left = self.kill() if self.pids() else []
        deadline = time.monotonic() + timeout
        pending = list(self.dirs.values())
        while pending:
            directory = pending[0]
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(exc.errno, f"cannot remove cgroup {directory}: {exc.strerror}") from None
                self.kill()
                time.sleep(0.01)
                continue
            pending.pop(0)
        return left


# -- probing ------------------------------------------------------------------------------------------


def probe(mode: str = "auto", parent: str = "") -> tuple[CgroupTree | None, str | None]:
    """The runtime's cgroup tree, or None and why not (``mode`` ``off``: None, "disabled by configuration").

    cgroup v2 is tried first (if its hierarchy has the memory and pids controllers), then v1.
    """
    if mode == "off":
        return None, "cgroup: disabled by configuration"
    mounts = fs.mounts()
    own = fs.own_cgroups()
    reasons: list[str] = []
    unified = mounts.get("unified")
    if unified is not None:
        available = set(fs.read(unified / "cgroup.controllers").split())
        if {"memory", "pids"} <= available:
            try:
                return _v2(unified, parent or own.get("", "/")), None
            except OSError as exc:
                reasons.append(f"cgroup v2: {exc}")
        else:
            reasons.append("cgroup v2: the memory and pids controllers are not on the unified hierarchy")
    if all(name in mounts for name in _V1_REQUIRED):
        try:
            return _v1(mounts, own, parent), None
        except OSError as exc:
            reasons.append(f"cgroup v1: {exc}")
    else:
        reasons.append("cgroup v1: memory and pids hierarchies are not both mounted")
    return None, "cgroup: " + "; ".join(reasons)


def members(report: Mapping[str, Any]) -> list[int] | None:
    """The pids now in the group an isolation record's ``cgroup`` value names; None once it is removed.

    For operators and tests: every process of a stub's tree, whatever it did to leave the host's tree.
    """
    mount = fs.mounts().get("unified" if report.get("version") == 2 else "memory")
    if mount is None:
        return None
    directory = mount / str(report.get("path", "")).lstrip("/")
    if not directory.is_dir():
        return None
    return fs.ints(directory / "cgroup.procs")


def _v1(mounts: dict[str, Path], own: dict[str, str], parent: str) -> CgroupTree:
    dirs: dict[str, Path] = {}
    reported = ""
    try:
        for controller in (*_V1_REQUIRED, "cpuacct"):
            mount = mounts.get(controller)
            if mount is None:
                continue
            base = parent or own.get(controller, "/")
            rel = f"{base.rstrip('/')}/{fs.group_name()}"
            reported = reported or rel  # the memory hierarchy's path names the group in reports
            directory = mount / rel.lstrip("/")
            fs.clear_stale(directory.parent)
            directory.mkdir(parents=True, exist_ok=True)
            dirs[controller] = directory
            if controller == "memory":
                fs.write_if_present(directory / "memory.use_hierarchy", 1)
            # A writable cgroup.procs is what delegation means; find out now rather than at the first deploy.
            if not os.access(directory / "cgroup.procs", os.W_OK):
                raise PermissionError(errno.EACCES, f"{directory}/cgroup.procs is not writable")
    except OSError as exc:
        for directory in dirs.values():
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise CgroupError(exc.errno, str(exc)) from None
    return CgroupTree(1, dirs, reported)


def _v2(mount: Path, own: str, /) -> CgroupTree:
    """Take ``own`` (delegated to us) for the runtime: itself in a leaf, the stubs' groups beside it."""
    base = mount / own.lstrip("/")
    enabled = set(fs.read(base / "cgroup.subtree_control").split())
    wanted = [c for c in _V2_CONTROLLERS if c in fs.read(base / "cgroup.controllers").split()]
    if not {"memory", "pids"} <= enabled:
        if own.strip("/"):  # not the root cgroup, which may hold processes and still have children
            others = [pid for pid in fs.ints(base / "cgroup.procs") if pid != os.getpid()]
            if others:
                raise CgroupError(errno.EBUSY, f"{own} holds other processes ({len(others)}): not delegated to us")
            if os.getpid() in fs.ints(base / "cgroup.procs"):
                leaf = base / "runtime"
                leaf.mkdir(exist_ok=True)
                fs.write(leaf / "cgroup.procs", os.getpid())
        fs.write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
    directory = base / fs.group_name()
    fs.clear_stale(base)
    directory.mkdir(exist_ok=True)
    fs.write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
    return CgroupTree(2, {"unified": directory}, f"{own.rstrip('/')}/{fs.group_name()}")


def hierarchies() -> dict[str, Path]:
    """Where each cgroup hierarchy is mounted: ``unified`` (cgroup2) and the v1 ``memory``, ``pids``,
    ``cpuacct`` (for an administrator's script delegating a subtree, and the tests)."""
    return fs.mounts()
