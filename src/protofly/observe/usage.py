"""What a stub's processes cost now, for the console and ``/metrics``: the stub's own accounting first.

The figures are :meth:`protofly.Runtime.usage` (the stub's cgroup: memory now and at its peak, CPU seconds,
processes).  Where the stub has no cgroup (the machine offers none, see its ``isolation["missing"]``) the
console still shows something true rather than nothing: the resident memory and CPU seconds summed over the
process tree below the host pid the deployment recorded, read from ``/proc``, in the same
:class:`~protofly.sandbox.cgroup.Usage` model (no peak).  Both read small kernel files, so :func:`read_all`
runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from protofly.sandbox.cgroup import Usage
from protofly.sandbox.proctree import tree

if TYPE_CHECKING:
    from protofly.runtime import Runtime

__all__ = ["read_all", "read_tree"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def read_tree(pid: int) -> Usage | None:
    """The usage of ``pid``'s tree from ``/proc`` (resident memory, no peak); None when the process is gone."""
    memory = 0
    ticks = 0
    count = 0
    for member in tree(pid):
        try:
            with open(f"/proc/{member}/stat", "rb") as handle:
                stat = handle.read()
            with open(f"/proc/{member}/statm", "rb") as handle:
                statm = handle.read().split()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        memory += int(statm[1]) * _PAGE  # resident pages
        count += 1
    if count == 0:
        return None
    return Usage(memory_bytes=memory, memory_peak_bytes=None, cpu_seconds=ticks / _TICKS, processes=count)


def read_all(runtime: Runtime, stubs: Iterable[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """``{domain: usage}`` (``Usage.as_dict`` form) for ``(domain, host pid)`` pairs; run it in a thread."""
    found = {}
    for domain, pid in stubs:
        usage = runtime.usage(domain)
        if usage is None:
            fallback = read_tree(pid)
            usage = None if fallback is None else fallback.as_dict()
        if usage is not None:
            found[domain] = usage
    return found
