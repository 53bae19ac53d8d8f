"""Test stub: leaves a daemon behind (double fork, new session: no longer in the host's process tree) and
answers with the daemon's pid.  Removing the stub must still kill it: it is in the stub's cgroup.
Data for the tests: read as bytes and deployed, never imported.
"""

import os
import time

from protofly.stub import Message, ProtoStub


class Escaper(ProtoStub):
    def on_message(self, msg: Message) -> None:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                time.sleep(600)
            os._exit(0)
        os.waitpid(child, 0)
        daemon = int(os.read(read, 32))
        body = {"code": 200, "value": {"daemon": daemon}}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
