"""Test stub: tries to make namespaces (``clone`` with namespace flags, ``clone3``, ``unshare``) and reports
the errno of each, with who it is (its uid and gid) and whether an ordinary fork and a thread still work.

Data for the tests: read as bytes and deployed, never imported.
"""

import ctypes
import os
import platform
import signal
import threading

from protofly.stub import Message, ProtoStub

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
SYSCALLS = {"x86_64": {"clone": 56, "clone3": 435}, "aarch64": {"clone": 220, "clone3": 435}}

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
        )
    ]


def _outcome(result: int) -> str:
    if result == 0:
        os._exit(0)  # the child of a clone that should not have worked
    if result > 0:
        os.waitpid(result, 0)
        return "created"
    return f"errno {ctypes.get_errno()}"


def _clone(flags: int) -> str:
    number = SYSCALLS[platform.machine()]["clone"]
    return _outcome(libc.syscall(ctypes.c_long(number), ctypes.c_ulong(flags | signal.SIGCHLD), None, None, None, None))


def _clone3(flags: int) -> str:
    args = CloneArgs(flags=flags, exit_signal=signal.SIGCHLD)
    number = SYSCALLS[platform.machine()]["clone3"]
    return _outcome(libc.syscall(ctypes.c_long(number), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))))


def _unshare(flags: int) -> str:
    return "created" if libc.unshare(ctypes.c_int(flags)) == 0 else f"errno {ctypes.get_errno()}"


def _fork() -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}"


def _thread() -> str:
    seen = []
    worker = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    worker.start()
    worker.join(5)
    return "ran" if seen else "did not run"


class NsProbe(ProtoStub):
    def on_message(self, msg: Message) -> None:
        value = {
            "clone_newuser": _clone(CLONE_NEWUSER),
            "clone_newns_newnet": _clone(CLONE_NEWNS | CLONE_NEWNET),
            "clone_newpid": _clone(CLONE_NEWPID),
            "clone3_newuser": _clone3(CLONE_NEWUSER),
            "clone3_plain": _clone3(0),
            "unshare_newuser": _unshare(CLONE_NEWUSER),
            "fork": _fork(),
            "thread": _thread(),
            "uid": list(os.getresuid()),
            "gid": list(os.getresgid()),
            "groups": os.getgroups(),
        }
        body = {"code": 200, "value": value}
        self.deliver(Message(id=msg.id, type="response", from_=msg.to, to=msg.from_, body=body))
