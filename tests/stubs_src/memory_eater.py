"""Test stub: takes memory the ways rlimits do not see, each asked for by ``{"how": ...}``:

* ``children``: four forked children, each touching 64 MiB (every process stays under its own
  RLIMIT_AS, the tree does not);
* ``memfd``: 1 GiB written into a memfd (never mapped, so never in the address space);
* ``tmp``: 1 GiB written into a file in the private /tmp (a tmpfs: host memory).

The stub's cgroup must stop the tree at the descriptor's memory limit and the runtime must record it.
It answers with what it managed (or the error), if it lives long enough.  Data for the tests: read as
bytes and deployed, never imported.
"""

import os
import time

from protofly.stub import Message, ProtoStub

MIB = 1 << 20
CHUNK = b"\x5a" * MIB


def _children() -> dict:
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            hoard = bytearray(64 * MIB)
            for offset in range(0, len(hoard), 4096):
                hoard[offset] = 1
            time.sleep(600)
            os._exit(0)
        pids.append(pid)
    time.sleep(5)  # the children touch their pages meanwhile
    return {"children": pids}


def _fill(fd: int) -> dict:
    written = 0
    try:
        for _ in range(1024):
            written += os.write(fd, CHUNK)
    except OSError as exc:
        return {"written_mib": written // MIB, "errno": exc.errno}
    return {"written_mib": written // MIB}


class MemoryEater(ProtoStub):
    def on_message(self, msg: Message) -> None:
        how = (msg.body or {}).get("how")
        if how == "children":
            value = _children()
        elif how == "memfd":
            value = _fill(os.memfd_create("hoard"))
        elif how == "tmp":
            value = _fill(os.open("/tmp/hoard", os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            value = {"error": f"unknown how {how!r}"}
        body = {"code": 200, "value": value}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
