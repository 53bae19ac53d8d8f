"""Isolation applied by the sandbox host to itself, after its own imports and before any stub code runs.

bubblewrap (see :mod:`protofly.sandbox.isolation`) builds the namespaces from outside; these layers are
applied from inside, per stub, in this order:

1. rlimits: address space, CPU seconds (counted from now, the host's own start-up is not charged),
   open files, no core dumps;
2. ``PR_SET_NO_NEW_PRIVS`` and an empty capability set (a host started as root without bwrap keeps no
   privileges: bounding set, effective, permitted and inheritable sets are cleared);
3. Landlock: read-only access to the interpreter, the protofly package and a few ``/etc`` files, write
   access only to the private working directory, no TCP ``bind``, and (ABI 6+) no signals to and no
   abstract-socket connections with processes outside the sandbox;
4. seccomp: a deny-list (mount, ptrace, unshare, setns, bpf, keyctl, module loading, io_uring, ...)
   answering ``EPERM``; ``clone`` with a namespace flag (user, mount, network, pid, ipc, uts, cgroup)
   answering ``EPERM`` and ``clone3`` answering ``ENOSYS`` (its flags live in memory a filter cannot
   read, so libc falls back to ``clone``, whose flags it can); and socket families other than
   unix/inet/inet6 answering ``EAFNOSUPPORT``.  x86_64 and aarch64 have their own syscall numbers.

Each layer reports what it did; a layer that cannot be applied is added to ``missing`` with the reason,
and the host sends the report to the runtime before the stub's code runs, so the stub cannot alter it.
Everything is plain ``ctypes`` (no dependency to import inside every sandbox).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protofly.sandbox.limits import Limits

__all__ = ["apply", "drop_user", "set_parent_death_signal"]

_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    libc = _c()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    if libc.prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(expected_parent: int | None) -> None:
    """Die with SIGKILL when the runtime dies, even if the runtime itself is SIGKILLed.

    Checked against ``expected_parent`` afterwards, since the runtime may have died between our fork and
    this call (then the signal would never come).
    """
    import signal

    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def drop_user(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids; no supplementary groups).

    A root runtime's bwrap starts the host as root with only CAP_SETUID and CAP_SETGID: this is the
    first thing the host does, and changing from uid 0 to another clears every capability.  Checked.
    """
    if uid == 0 or gid == 0:
        raise ValueError("the sandbox user must not be root")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or _effective_caps() != 0:
        raise OSError(errno.EPERM, "the user switch did not take (ids or capabilities left)")


def apply(limits: Limits | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Apply every layer; return the report of what is active and what is missing (never raises)."""
    report: dict[str, Any] = {}
    missing: list[str] = []
    if limits is not None:
        _layer(report, missing, "rlimits", lambda: _rlimits(limits))
    else:
        missing.append("rlimits: none requested")
    _layer(report, missing, "no_new_privs", _no_new_privs)
    _layer(report, missing, "capabilities", _drop_capabilities)
    if threading.active_count() != 1:
        missing.append("landlock: the host has more than one thread")
        missing.append("seccomp: the host has more than one thread")
    else:
        if settings.get("landlock", True):
            _layer(report, missing, "landlock", lambda: _landlock(settings))
        else:
            missing.append("landlock: disabled by configuration")
        if settings.get("seccomp", True):
            _layer(report, missing, "seccomp", _seccomp)
        else:
            missing.append("seccomp: disabled by configuration")
    report["missing"] = missing
    return report


def _layer(report: dict[str, Any], missing: list[str], name: str, action: Any) -> None:
    try:
        report[name] = action()
    except Exception as exc:
        missing.append(f"{name}: {type(exc).__name__}: {exc}")


# -- rlimits -------------------------------------------------------------------------------------------


def _rlimits(limits: Limits) -> dict[str, int]:
    memory = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # RLIMIT_CPU counts from the process start; charge the stub only for what it uses from now on.  The
    # hard limit is one second later, so the soft limit's SIGXCPU (reported as such) comes first.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    cpu = used + limits.cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return limits.as_dict()


# -- privileges ----------------------------------------------------------------------------------------


def _no_new_privs() -> bool:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    return True


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> str:
    """Empty the bounding set, then the effective/permitted/inheritable sets (all threads: we have one)."""
    if _effective_caps() == 0:
        return "none"
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last = int(handle.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        try:
            _prctl(_PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    libc = _c()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    if _effective_caps() != 0:
        raise OSError(errno.EPERM, "capabilities are still effective after capset")
    return "dropped"


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return -1


# -- Landlock ------------------------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (generic syscall table)
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1  # ABI 6

_FILE_ACCESS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR


def _syscall(number: int, *args: Any) -> int:
    libc = _c()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _landlock(settings: Mapping[str, Any]) -> str:
    abi = _syscall(
        _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    )
    handled_fs = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        handled_fs |= _FS_REFER
    if abi >= 3:
        handled_fs |= _FS_TRUNCATE
    if abi >= 5:
        handled_fs |= _FS_IOCTL_DEV
    handled_net = _NET_BIND_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    buffer = ctypes.create_string_buffer(attr[:size], size)
    ruleset = _syscall(_SYS_LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        for path in _existing(settings.get("read_paths", ())):
            _allow(ruleset, path, _READ & handled_fs)
        for path in _existing(settings.get("write_paths", ())):
            _allow(ruleset, path, handled_fs)
        for path in _existing(("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")):
            _allow(ruleset, path, (_FS_READ_FILE | _FS_WRITE_FILE) & handled_fs)
        _allow(ruleset, f"/proc/{os.getpid()}", (_FS_READ_FILE | _FS_READ_DIR) & handled_fs)
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    parts = ["fs"]
    if handled_net:
        parts.append("no tcp bind")
    if scoped:
        parts.append("signal and abstract-socket scoping")
    return f"abi {abi}: " + ", ".join(parts) + "; read-only allow-list, writable working directory only"


def _existing(paths: Iterable[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(path):
            access &= _FILE_ACCESS
        rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        _syscall(
            _SYS_LANDLOCK_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
            rule,
            ctypes.c_uint32(0),
        )
    finally:
        os.close(fd)


# -- seccomp -------------------------------------------------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_AARCH64 = 0xC00000B7
#: x86_64 syscall numbers denied with EPERM (the docker-default style list, plus io_uring and new mount API).
_DENIED_X86_64 = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "ustat": 136, "sysfs": 139,
    "vhangup": 153, "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176,
    "get_kernel_syms": 177, "query_module": 178, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212,
    "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
_SYS_SOCKET_X86_64 = 41
#: aarch64 (the generic table): the same list, less the calls that architecture never had.
_DENIED_AARCH64 = {
    "ptrace": 117, "syslog": 116, "personality": 92, "vhangup": 58, "pivot_root": 41, "adjtimex": 171,
    "chroot": 51, "acct": 89, "settimeofday": 170, "mount": 40, "umount2": 39, "swapon": 224, "swapoff": 225,
    "reboot": 142, "init_module": 105, "delete_module": 106, "quotactl": 60, "nfsservctl": 42,
    "lookup_dcookie": 18, "clock_settime": 112, "kexec_load": 104, "add_key": 217, "request_key": 218,
    "keyctl": 219, "unshare": 97, "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265,
    "clock_adjtime": 266, "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
    "finit_module": 273, "kexec_file_load": 294, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Arch:
    """One architecture's numbers: its audit value, the deny-list, and the calls filtered on arguments."""

    audit: int
    denied: Mapping[str, int]
    socket: int
    clone: int
    clone3: int
    x32: bool  # x86_64: numbers from 0x40000000 up are the x32 ABI, refused as a whole


_ARCHES = {
    "x86_64": _Arch(_AUDIT_ARCH_X86_64, _DENIED_X86_64, _SYS_SOCKET_X86_64, clone=56, clone3=435, x32=True),
    "aarch64": _Arch(_AUDIT_ARCH_AARCH64, _DENIED_AARCH64, socket=198, clone=220, clone3=435, x32=False),
}
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: a new namespace, refused.
_CLONE_NEW_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp() -> str:
    machine = platform.machine()
    arch = _ARCHES.get(machine)
    if arch is None or sys.byteorder != "little":
        raise OSError(errno.ENOSYS, f"no syscall table for {machine} ({sys.byteorder}-endian)")
    program = _seccomp_program(arch)
    code = b"".join(struct.pack("=HBBI", *ins) for ins in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
    return (
        f"{machine}: deny-list of {len(arch.denied)} syscalls, no namespace-creating clone, no clone3, "
        f"socket families unix/inet/inet6 ({fprog.len} instructions)"
    )


def _seccomp_program(arch: _Arch) -> list[tuple[int, int, int, int]]:
    """A classic BPF program over ``struct seccomp_data`` (nr at 0, arch at 4, args at 16, little-endian)."""
    errno_eperm = _RET_ERRNO | errno.EPERM
    program: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # A = arch
        (_JEQ_K, 1, 0, arch.audit),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),  # a foreign ABI (i386 via int 0x80, arm32) could bypass the numbers
        (_LD_W_ABS, 0, 0, 0),  # A = nr
    ]
    if arch.x32:
        program.append((_JGE_K, 0, 1, 0x40000000))  # the x32 ABI, likewise
        program.append((_RET_K, 0, 0, errno_eperm))
    for number in sorted(arch.denied.values()):
        program.append((_JEQ_K, 0, 1, number))
        program.append((_RET_K, 0, 0, errno_eperm))
    program += _clone_rules(arch)
    families = len(_ALLOWED_FAMILIES)
    program.append((_JEQ_K, 0, families + 2, arch.socket))  # not socket(): to the final allow
    program.append((_LD_W_ABS, 0, 0, 16))  # A = low 32 bits of args[0] (the family)
    for index, family in enumerate(_ALLOWED_FAMILIES):
        program.append((_JEQ_K, families - index, 0, family))
    program.append((_RET_K, 0, 0, _RET_ERRNO | errno.EAFNOSUPPORT))
    program.append((_RET_K, 0, 0, _RET_ALLOW))
    return program


def _clone_rules(arch: _Arch) -> list[tuple[int, int, int, int]]:
    """``clone3`` → ENOSYS; ``clone`` with a namespace flag → EPERM, any other ``clone`` allowed (A = nr).

    The flags are ``clone``'s first argument on both architectures; every namespace flag is in its low
    32 bits, the word a classic BPF load reads at offset 16 on a little-endian machine.
    """
    return [
        (_JEQ_K, 0, 1, arch.clone3),
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_JEQ_K, 0, 4, arch.clone),  # not clone(): past the four below, on to the socket() check
        (_LD_W_ABS, 0, 0, 16),  # A = low 32 bits of args[0] (the flags)
        (_JSET_K, 0, 1, _CLONE_NEW_NAMESPACES),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
