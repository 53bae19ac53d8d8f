"""Run by test_runtime_as_user.py as an unprivileged user: a runtime that deploys one stub, asks it who it
is, prints one JSON line (the runtime's uid, the stub's isolation record and answer, its host pids) and
waits for a line on stdin before it closes.  Not a test module: copied next to a readable interpreter."""

import asyncio
import json
import os
import sys
from pathlib import Path

from protofly.config import RuntimeConfig
from protofly.message import Message
from protofly.runtime import Runtime


def tree(pid: int) -> list[int]:
    found, queue = [pid], [pid]
    while queue:
        current = queue.pop()
        try:
            children = [int(x) for x in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            continue
        found += children
        queue += children
    return found


async def main(settings: dict) -> None:
    async with Runtime(RuntimeConfig.from_mapping(settings)) as runtime:
        question = Message(type="read", from_="hyperty://a.test/me", to="hyperty://b.test/anyone")
        answer = await runtime.bus.request(question, timeout=30)
        record = runtime.registry.stub("b.test")
        report = {
            "uid": os.getuid(),
            "answer": answer.body,
            "isolation": record.isolation,
            "history": [[event.value, event.description] for event in record.history],
            "pids": tree(record.info["pid"]) if record.info.get("pid") else [],
            "usage": runtime.usage("b.test"),
        }
        print(json.dumps(report), flush=True)
        await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 60)


asyncio.run(main(json.loads(sys.argv[1])))
