"""How the process sandbox starts a host: its settings, its command line (under bwrap or not), its workdir.

Pure functions of :class:`HostSettings` and the isolation probe (:mod:`~protofly.sandbox.isolation`), so
that :class:`~protofly.sandbox.process_component.ProcessComponent` only runs what they describe.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import msgspec

from protofly.sandbox import Limits
from protofly.sandbox import isolation as iso
from protofly.sandbox.cgroup import CgroupTree

__all__ = ["HostCommand", "HostSettings", "host_command", "make_workdir", "namespaces", "own_network"]


@dataclass(frozen=True, slots=True)
class HostSettings:
    """How the process sandbox starts its hosts (the same for every host it starts)."""

    python: str
    max_frame: int
    landlock: bool
    seccomp: bool
    preload: tuple[str, ...]
    workdir_root: str | None
    #: The runtime's limits: a spare's cgroup has them until a deploy narrows them to the stub's.
    limits: Limits
    #: Size of the private /tmp (bwrap ``--size``).
    tmp_mb: int = 64
    #: The runtime's cgroup tree (None: no cgroup layer, ``cgroup_missing`` says why).
    cgroups: CgroupTree | None = None
    cgroup_missing: str | None = None
    #: Why hosts run with the runtime's root ids (None: they do not).
    user_missing: str | None = None
    #: A JavaScript stub's host: confined, then Node.js (see :mod:`~protofly.sandbox.node_exec`).
    node_spare: bool = False
    #: The sandbox's memory limit, from which a Node host's V8 heap limit is set at its start.
    memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class HostCommand:
    """What to execute for one host: the argument vector, its environment and working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


def namespaces(probe: iso.Probe) -> tuple[str, ...]:
    """The probe's namespaces, the network one included for Python and Node hosts alike."""
    return probe.namespaces


def own_network(probe: iso.Probe) -> bool:
    """The host runs in a network namespace of its own (bwrap, with the probe's network namespace)."""
    return probe.bwrap is not None and "--unshare-net" in namespaces(probe)


def host_command(
    settings: HostSettings, probe: iso.Probe, *, fd: int, egress_fd: int, gate: int, workdir: str | None
) -> HostCommand:
    """The host's command: ``python -I -m protofly.sandbox.host SETTINGS``, inside bwrap when there is one.

    ``fd`` is the host's end of the channel, ``egress_fd`` of the socket-passing pair; ``gate`` holds the
    host until the runtime has placed it in its cgroup (bwrap's ``--block-fd``, or the host's own wait).
    """
    bwrap = probe.bwrap is not None
    host_settings: dict[str, Any] = {
        "fd": fd,
        "egress_fd": egress_fd,
        "max_frame": settings.max_frame,
        "parent_pid": None if bwrap else os.getpid(),
        "read_paths": iso.read_paths(),
        "write_paths": ["/tmp"] if bwrap else [workdir],
        "landlock": settings.landlock,
        "seccomp": settings.seccomp,
        "preload": list(settings.preload),
        **_javascript_settings(settings),
    }
    if not bwrap:
        host_settings["gate_fd"] = gate
    if probe.host_drops is not None:
        host_settings["user"] = list(probe.host_drops)
    args = ["-m", "protofly.sandbox.host", msgspec.json.encode(host_settings).decode()]
    if probe.bwrap is not None:
        argv = iso.bwrap_command(
            probe.bwrap,
            namespaces(probe),
            settings.python,
            args,
            containment=iso.containment_options(probe, block_fd=gate),
            tmp_bytes=settings.tmp_mb << 20,
        )
        return HostCommand(argv, {}, "/")
    assert workdir is not None, "a host without bwrap runs in its own workdir"
    return HostCommand([settings.python, "-I", *args], iso.host_env(workdir), workdir)


def make_workdir(root: str | None, user: tuple[int, int] | None) -> str:
    """The private working directory of a host run without bwrap, owned by the user it runs as."""
    path = tempfile.mkdtemp(prefix="protofly-stub-", dir=root)
    if user is not None:
        os.chown(path, user[0], user[1])
    return path


def _javascript_settings(settings: HostSettings) -> dict[str, Any]:
    """What a JavaScript stub's host needs to become Node.js (nothing for a Python stub's host)."""
    if not settings.node_spare:
        return {}
    from protofly.sandbox.node import node_executable, node_modules

    return {
        "node_spare": True,
        "node": node_executable(),
        "node_modules": node_modules(),
        "memory_mb": settings.memory_mb,
    }
