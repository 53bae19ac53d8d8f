"""The hand-over from a Python sandbox host to the Node.js host, for a JavaScript stub.

A sandbox host is started (and pre-started as a spare) as ``python -I -m protofly.sandbox.host`` inside
bubblewrap, whatever language its stub will be.  When its ``create`` names a JavaScript stub, the host
confines itself exactly as for a Python stub, except for the memory limit, reports that to the runtime
*before* any stub code runs, and then replaces itself (``execve``, same process, same pid, same channel)
with ``node node_host.js``.  Everything applied here survives the ``execve``: namespaces, rlimits,
``no_new_privs``, the dropped capabilities, Landlock and seccomp; the environment stays the scrubbed one.

Memory: V8 reserves gigabytes of address space it never uses, so ``RLIMIT_AS`` (the Python host's memory
limit) would stop Node from starting at all.  A JavaScript stub's ``memoryMB`` is enforced instead with
``RLIMIT_DATA`` (what the process may actually allocate) and V8's own heap limit
(``--max-old-space-size``, three quarters of it), so that a stub that allocates without bound ends with
V8's "heap out of memory" rather than in a random ``malloc`` failure.

The ``create`` message (and any traffic that arrived with it) is handed to Node in an anonymous file
(``memfd``), since a stub's source can be larger than one ``execve`` argument may be.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable, Mapping
from typing import Any

from protofly.sandbox import confine
from protofly.sandbox.limits import Limits
from protofly.sandbox.node import NODE_HOST

__all__ = ["heap_limit_mb", "node_command", "prepare"]

#: Lines of console output per second a stub may write before the rest are counted and dropped.
_LOG_PER_SECOND = 200


def heap_limit_mb(memory_mb: int) -> int:
    """V8's old-space limit for a stub allowed ``memory_mb``: three quarters, at least 16 MiB."""
    return max(16, memory_mb * 3 // 4)


def _rlimits(limits: Limits) -> dict[str, Any]:
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime) + 1 + limits.cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return {**limits.as_dict(), "memory": f"RLIMIT_DATA and a V8 heap limit of {heap_limit_mb(limits.memory_mb)} MiB"}


def confine_for_node(limits: Limits | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`protofly.sandbox.confine.apply`, with the memory limit a Node process can live with."""
    rlimits: dict[str, Any] | None = None
    problem: str | None = None
    if limits is not None:
        try:
            rlimits = _rlimits(limits)
        except (OSError, ValueError) as exc:
            problem = f"rlimits: {type(exc).__name__}: {exc}"
    report = confine.apply(None, settings)
    missing = [m for m in report.get("missing", []) if not m.startswith("rlimits:")]
    if rlimits is not None:
        report["rlimits"] = rlimits
    else:
        missing.insert(0, problem or "rlimits: none requested")
    report["missing"] = missing
    report["host"] = "node"
    return report


def node_command(node: str, settings: Mapping[str, Any], limits: Limits | None, handover: int) -> list[str]:
    """The Node.js command line of a JavaScript stub's host."""
    host_settings = {
        "fd": settings["fd"],
        "handover": handover,
        "maxFrame": settings.get("max_frame"),
        "nodeModules": settings.get("node_modules"),
        "logPerSecond": _LOG_PER_SECOND,
    }
    flags = ["--no-deprecation"]
    if limits is not None:
        flags.append(f"--max-old-space-size={heap_limit_mb(limits.memory_mb)}")
    return [node, *flags, str(NODE_HOST), json.dumps(host_settings)]


def prepare(
    create: dict[str, Any], backlog: list[dict[str, Any]], limits: Limits | None, settings: Mapping[str, Any]
) -> tuple[dict[str, Any], Callable[[], None]]:
    """Confine for Node, write the hand-over; return the isolation report and the call that starts Node.

    The caller sends the report to the runtime (synchronously) before calling the returned function,
    which never returns: it ``execve``s Node, or ends the process if that fails.
    """
    node = settings.get("node")
    if not isinstance(node, str) or not node:
        raise RuntimeError("Node.js is not available in this sandbox host")
    handover = os.memfd_create("protofly-create", 0)
    data = json.dumps({"create": create, "backlog": backlog}).encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(handover, view) :]
    os.lseek(handover, 0, os.SEEK_SET)
    os.set_inheritable(handover, True)
    os.set_inheritable(int(settings["fd"]), True)
    report = confine_for_node(limits, settings)
    command = node_command(node, settings, limits, handover)

    def start() -> None:
        try:
            os.execve(node, command, dict(os.environ))
        except OSError as exc:
            os.write(2, f"protofly sandbox host: cannot start Node.js ({node}): {exc}\n".encode())
            os._exit(127)

    return report, start
