"""A minimal runtime for the process-hygiene tests, run as its own process.

It deploys stubs in a ProcessSandbox (with a pre-started spare): one echo stub, and COUNT-1 stubs busy in
an endless loop, which do not notice that their channel closed (only PR_SET_PDEATHSIG or bwrap's
--die-with-parent can end them when the runtime is SIGKILLed).  It prints one JSON line with the pid of
every process the sandbox started, then waits.  SIGTERM cancels its main task, as an application's
shutdown would; the test may also SIGKILL it.  Usage: ``python sandbox_runtime.py COUNT bwrap|plain``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from protofly.message import Message
from protofly.sandbox import Boundary
from protofly.sandbox.process import ProcessSandbox

STUBS = Path(__file__).resolve().parents[2] / "stubs_src"
ECHO = (STUBS / "echo.py").read_bytes()
LOOP = (STUBS / "cpu_loop.py").read_bytes()
RUNTIME = "hyperty-runtime://a.test/hygiene"


def tree(pid: int) -> list[int]:
    found = [pid]
    for current in found:
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(x) for x in children)
    return found


async def main(count: int, use_bwrap: bool) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    sandbox = ProcessSandbox(use_bwrap=use_bwrap, prestart=1)
    boundary = Boundary(runtime_url=RUNTIME, runtime_domain="a.test", stub_domain="b.test")
    try:
        components = [
            await sandbox.deploy(
                url=f"{RUNTIME}/protostub/{n}",
                source=ECHO if n == 1 else LOOP,
                config={},
                classname="EchoStub" if n == 1 else "CpuLoop",
                limits=None,
                boundary=boundary,
                on_message=lambda msg: None,
                on_exit=lambda reason: None,
            )
            for n in range(1, count + 1)
        ]
        for component in components[1:]:
            component.post(Message(type="create", from_="hyperty://a.test/h", to="hyperty://b.test/spin"))
        await sandbox.wait_ready()
        hosts = [host.pid for host in sandbox.hosts]
        assert {c.pid for c in components} < set(hosts)  # the deployed ones and the spare
        pids = [pid for host in hosts for pid in tree(host)]
        print(json.dumps({"pids": pids}), flush=True)
        await asyncio.Event().wait()
    finally:
        await sandbox.close()


if __name__ == "__main__":
    try:
        asyncio.run(main(int(sys.argv[1]), sys.argv[2] == "bwrap"))
    except asyncio.CancelledError:
        print(json.dumps({"closed": True}), flush=True)
