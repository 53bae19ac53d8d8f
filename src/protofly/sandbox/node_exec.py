"""How a JavaScript stub's host becomes a confined Node.js process.

A JavaScript host starts like a Python one, ``python -I -m protofly.sandbox.host SETTINGS`` inside
bubblewrap, with ``node_spare`` in its settings.  Before anything else it confines itself with the layers
that do not depend on the stub (``no_new_privs``, capabilities, Landlock, seccomp: see
:mod:`protofly.sandbox.confine`), then replaces itself (``execve``: same process, same pid, same channel)
with ``node node_host.js``, which pre-creates the stub's context and says ``ready``.  Everything applied
here survives the ``execve``; the environment stays the scrubbed one.  The host is then a spare, like a
pre-started Python host: a deploy costs only the stub's own start.

The stub's rlimits (known only at deploy) are applied from outside by the runtime with ``prlimit(2)``
before the ``create`` (see :func:`apply_rlimits`), and the Node host checks them in ``/proc/self/limits``
before the stub's code runs, reporting them with the other layers.

Memory: V8 reserves gigabytes of address space it never uses, so ``RLIMIT_AS`` (the Python host's memory
limit) would stop Node from starting at all.  A JavaScript stub's ``memoryMB`` is enforced with
``RLIMIT_DATA`` (what the process may actually allocate), under a V8 heap limit set when the host starts
(``--max-old-space-size``: three quarters of the sandbox's memory limit), so that a stub that allocates
without bound ends with V8's "out of memory" abort, reported as a memory limit.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from protofly.sandbox import confine
from protofly.sandbox.limits import Limits
from protofly.sandbox.node import NODE_HOST

__all__ = ["apply_rlimits", "exec_spare", "heap_limit_mb", "node_command"]

#: Lines of console output per second a stub may write before the rest are counted and dropped.
_LOG_PER_SECOND = 200


def heap_limit_mb(memory_mb: int) -> int:
    """V8's old-space limit for a stub allowed ``memory_mb``: three quarters, at least 16 MiB."""
    return max(16, memory_mb * 3 // 4)


def node_command(node: str, settings: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
    """The Node.js command line of a JavaScript host (``report``: the layers applied before it)."""
    host_settings = {
        "fd": settings["fd"],
        "maxFrame": settings.get("max_frame"),
        "nodeModules": settings.get("node_modules"),
        "logPerSecond": _LOG_PER_SECOND,
        "isolation": report,
    }
    flags = ["--no-deprecation"]
    memory = settings.get("memory_mb")
    if isinstance(memory, int) and memory > 0:
        flags.append(f"--max-old-space-size={heap_limit_mb(memory)}")
    return [node, *flags, str(NODE_HOST), json.dumps(host_settings)]


def exec_spare(settings: Mapping[str, Any]) -> NoReturn:
    """Confine (every layer but the rlimits), then become the Node host; never returns."""
    node = settings.get("node")
    try:
        if not isinstance(node, str) or not node:
            raise RuntimeError("Node.js is not installed (the runtime found no node on its PATH)")
        os.set_inheritable(int(settings["fd"]), True)
        env = dict(os.environ)
        egress_fd = settings.get("egress_fd")
        if isinstance(egress_fd, int):  # Node opens it as its IPC channel: the stub's sockets arrive there
            os.set_inheritable(egress_fd, True)
            env.update(NODE_CHANNEL_FD=str(egress_fd), NODE_CHANNEL_SERIALIZATION_MODE="json")
        report = confine.apply(None, settings)
        report["missing"] = [m for m in report.get("missing", []) if not m.startswith("rlimits:")]
        report["host"] = "node"
        os.execve(node, node_command(node, settings, report), env)
    except Exception as exc:
        os.write(2, f"protofly sandbox host: cannot start Node.js ({node}): {exc}\n".encode())
    os._exit(127)


def apply_rlimits(pid: int, limits: Limits, user: tuple[int, int] | None = None) -> dict[str, Any]:
    """Give the Node host ``pid`` the stub's limits (from outside: Node has no setrlimit of its own).

    CPU seconds count from now, as for a Python stub: the host's start-up is not charged.  ``user``: the
    sandbox user the host runs as (a root runtime's); another user's limits need CAP_SYS_RESOURCE, which
    root may not have (a container's root often lacks it), so util-linux's ``prlimit`` does it as that user
    (lowering limits needs no privilege).
    """
    memory = limits.memory_mb << 20
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    used = (int(fields[11]) + int(fields[12])) // os.sysconf("SC_CLK_TCK") + 1
    cpu = used + limits.cpu_seconds
    values = {
        resource.RLIMIT_DATA: (memory, memory),
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_NOFILE: (limits.open_files, limits.open_files),
        resource.RLIMIT_CORE: (0, 0),
    }
    if user is None:
        for which, value in values.items():
            resource.prlimit(pid, which, value)
    else:
        _prlimit_as(user, pid, values)
    return {**limits.as_dict(), "memory": "RLIMIT_DATA under the V8 heap limit"}


def _prlimit_as(user: tuple[int, int], pid: int, values: Mapping[int, tuple[int, int]]) -> None:
    import subprocess

    names = {resource.RLIMIT_DATA: "data", resource.RLIMIT_CPU: "cpu", resource.RLIMIT_NOFILE: "nofile"}
    names[resource.RLIMIT_CORE] = "core"
    options = [f"--{names[which]}={soft}:{hard}" for which, (soft, hard) in values.items()]
    done = subprocess.run(
        ["prlimit", f"--pid={pid}", *options],
        capture_output=True,
        timeout=10,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        user=user[0],
        group=user[1],
        extra_groups=[],
    )
    if done.returncode != 0:
        raise PermissionError(f"prlimit as uid {user[0]}: {done.stderr.decode(errors='replace').strip()}")
