"""What a stub's processes cost now: resident memory, CPU seconds and process count, read from ``/proc``.

A stub's sandbox is a process tree (bwrap's helpers and the host); its usage is the sum over the tree
below the host pid the deployment recorded (``StubRecord.info["pid"]``).  The reads are a few small procfs
files per process and run in a worker thread (:func:`read_all`), never on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from protofly.sandbox.proctree import tree

__all__ = ["Usage", "read_all", "read_usage"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Usage:
    """One stub's processes, summed: ``memory_bytes`` resident, ``cpu_seconds`` user+system, ``processes``."""

    memory_bytes: int
    cpu_seconds: float
    processes: int


def read_usage(pid: int) -> Usage | None:
    """The usage of ``pid``'s tree; None when the process is gone."""
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
    return Usage(memory, ticks / _TICKS, count)


def read_all(pids: Iterable[tuple[str, int]]) -> dict[str, Usage]:
    """``{domain: usage}`` for ``(domain, pid)`` pairs (run it in a thread)."""
    found = {}
    for domain, pid in pids:
        usage = read_usage(pid)
        if usage is not None:
            found[domain] = usage
    return found
