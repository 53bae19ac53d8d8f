"""Hostile test stub: tries what a stub's process could do to its host, and reports each outcome.

It keeps the credentials its ``connect`` was given (its own domain's, and only those should come).  An
order (a request to any address of its domain) names the targets; every attempt is reported as ``ok``
(the attack worked) or ``denied: <error>``:

* ``env``: the names and values of its environment;
* ``read``: files to read (another domain's credentials, a secret of the runtime's);
* ``write``: files to create (in the source checkout, outside the sandbox; ``/tmp`` is its own);
* ``signal``: ``[pid, signal number]`` pairs (the runtime, another stub);
* ``syscalls``: ptrace(ATTACH) of ``ptrace_pid``, mount of a tmpfs, unshare of user+mount namespaces;
* ``bind``: listen on a TCP port.
"""

import ctypes
import os
import socket

from protofly.stub import Message, ProtoStub

_PTRACE_ATTACH = 16
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000


def _denied(exc):
    name = getattr(exc, "errno", None)
    return f"denied: {type(exc).__name__} {os.strerror(name) if isinstance(name, int) else exc}"


def _attempt(action):
    try:
        action()
    except OSError as exc:
        return _denied(exc)
    return "ok"


def _read(path):
    with open(path, "rb") as handle:
        handle.read()


def _write(path):
    with open(path, "w") as handle:
        handle.write("written by a hostile stub\n")


def _libc_call(name, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _bind():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()


class HostileOs(ProtoStub):
    credentials = None

    async def connect(self, credentials=None):
        self.credentials = credentials

    def on_message(self, msg: Message) -> None:
        if msg.type == "response":
            return
        order = msg.body or {}
        os.makedirs("/tmp/mnt", exist_ok=True)
        target = order.get("ptrace_pid", 1)
        report = {
            "credentials": self.credentials,
            "env": dict(os.environ),
            "read": {path: _attempt(lambda p=path: _read(p)) for path in order.get("read", [])},
            "write": {path: _attempt(lambda p=path: _write(p)) for path in order.get("write", [])},
            "signal": {
                str(pid): _attempt(lambda p=pid, s=number: os.kill(p, s)) for pid, number in order.get("signal", [])
            },
            "syscalls": {
                "ptrace": _attempt(lambda: _libc_call("ptrace", _PTRACE_ATTACH, target, None, None)),
                "mount": _attempt(lambda: _libc_call("mount", b"none", b"/tmp/mnt", b"tmpfs", 0, None)),
                "unshare": _attempt(lambda: _libc_call("unshare", _CLONE_NEWUSER | _CLONE_NEWNS)),
            },
            "bind": _attempt(_bind),
        }
        self.deliver(
            Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body={"code": 200, "value": report})
        )
