"""Test stub: tries to write and read the paths it is given and reports what happened to each."""

import os

from protofly.stub import Message, ProtoStub


def _attempt(action, path):
    try:
        if action == "write":
            with open(path, "w") as handle:
                handle.write("written by a stub\n")
        else:
            with open(path) as handle:
                handle.read()
    except OSError as exc:
        return f"denied: {type(exc).__name__} errno {exc.errno}"
    return "ok"


class FsProbe(ProtoStub):
    def on_message(self, msg: Message) -> None:
        body = msg.body or {}
        results = {
            "write": {path: _attempt("write", path) for path in body.get("write", [])},
            "read": {path: _attempt("read", path) for path in body.get("read", [])},
            "status": open("/proc/self/status").read() if os.path.exists("/proc/self/status") else "",
        }
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=results))
