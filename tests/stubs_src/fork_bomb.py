"""Test stub: a fork bomb; asked with ``{"forks": N}`` it forks N sleeping children as fast as it can.

The stub's cgroup must cap the tree at its pids limit (forks beyond it fail with EAGAIN) and the runtime
must record the hit.  It answers with how many forks succeeded and failed, if it lives long enough.
Data for the tests: read as bytes and deployed, never imported.
"""

import os
import time

from protofly.stub import Message, ProtoStub


class ForkBomb(ProtoStub):
    def on_message(self, msg: Message) -> None:
        wanted = int((msg.body or {}).get("forks", 2000))
        forked, refused, errors = 0, 0, set()
        for _ in range(wanted):
            try:
                pid = os.fork()
            except OSError as exc:
                refused += 1
                errors.add(exc.errno)
                continue
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            forked += 1
        body = {"code": 200, "value": {"forked": forked, "refused": refused, "errnos": sorted(errors)}}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
