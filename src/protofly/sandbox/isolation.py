"""The runtime side of process isolation: which layers this machine offers, and the command that uses them.

One probe per interpreter (cached for the life of the runtime) finds out whether ``bwrap`` is installed and
which namespace options work here (a user namespace is tried first and dropped only if the kernel refuses
it).  The probe runs the real interpreter under the real profile, so a profile that cannot start Python is
found once, at start-up, with bwrap's own error text, and not at every deploy.

Profile: new user/pid/ipc/uts/cgroup namespaces (no further user namespace inside, ``--disable-userns``;
a root runtime uses no user namespace and the host drops to an unprivileged user, see :func:`sandbox_user`),
a network namespace of its own with no interface but loopback (the stub reaches nothing by itself: the
runtime opens the connections its descriptor declares and passes them in, see
:mod:`~protofly.sandbox.broker`), every capability dropped, the environment cleared,
``/usr``, the Python prefixes and the directory protofly is imported from bound read-only, a few ``/etc``
files a network client needs (resolver, CA certificates), a fresh ``/proc`` and ``/dev``, and a private
tmpfs on ``/tmp`` of a fixed size as the working directory; ``--die-with-parent`` and ``--new-session``;
``--block-fd`` holds the sandbox before it runs the host until the runtime has placed it in its cgroup.

A layer that is not available is never skipped silently: it is returned under ``missing`` with the
reason, logged as a warning and recorded in every component's ``isolation``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protofly.log import get_logger

__all__ = [
    "SANDBOX_UID",
    "Probe",
    "bwrap_command",
    "containment_options",
    "host_env",
    "namespace_names",
    "probe",
    "read_paths",
    "sandbox_user",
]

_log = get_logger("protofly.sandbox.isolation")

#: Namespace options, most isolating first; ``--unshare-user`` is the one a kernel may refuse.
_NAMESPACES = ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try")
#: The network layer, kept apart so that its absence is reported as its own missing layer.
_NETWORK = ("--unshare-net",)
#: Files and directories under /etc that a network client may read (DNS, TLS, time zone).
_ETC = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
)
_PROBE_TIMEOUT = 20.0
#: Options tried with a user namespace: no user namespace may be made inside it (bwrap 0.8+).
_USERNS_LOCK = ("--disable-userns",)
#: The uid and gid a stub has inside its user namespace (``nobody``), whoever it maps to on the host.
SANDBOX_UID = 65534


@dataclass(frozen=True)
class Probe:
    """What process isolation this machine offers (the result of :func:`probe`)."""

    bwrap: str | None  # path of a working bwrap, or None
    namespaces: tuple[str, ...] = ()  # bwrap options that work here
    missing: tuple[str, ...] = field(default=())
    #: (uid, gid) the hosts run as when the runtime is root; None: the runtime's own (unprivileged) ids.
    user: tuple[int, int] | None = None
    #: ``--disable-userns`` works here (bwrap 0.8+ with a user namespace).
    userns_locked: bool = False

    @property
    def user_namespace(self) -> bool:
        return "--unshare-user" in self.namespaces

    @property
    def spawn_user(self) -> tuple[int, int] | None:
        """Whom a host is started as (without bwrap: the interpreter is exec'd as the sandbox user)."""
        return self.user if self.bwrap is None else None

    @property
    def host_drops(self) -> tuple[int, int] | None:
        """Whom a host becomes right after it starts (root's bwrap: the host switches user itself)."""
        return self.user if self.bwrap is not None else None

    @property
    def network(self) -> bool:
        """Whether each stub gets a network namespace of its own (no interface but loopback)."""
        return "--unshare-net" in self.namespaces

    @property
    def namespace_names(self) -> list[str]:
        return namespace_names(self.namespaces)


def namespace_names(namespaces: tuple[str, ...]) -> list[str]:
    """``("--unshare-user", "--unshare-cgroup-try")`` → ``["user", "cgroup"]``."""
    return [opt.removeprefix("--unshare-").removesuffix("-try") for opt in namespaces]


_cache: dict[tuple[str, str | None, tuple[int, int] | None], Probe] = {}
_lock: asyncio.Lock | None = None


async def probe(
    python: str = sys.executable, *, use_bwrap: bool | None = None, user: tuple[int, int] | None = None
) -> Probe:
    """Find out once which layers work for ``python`` run as ``user`` (``use_bwrap``: None = if present,
    False = never)."""
    if use_bwrap is False:
        return await asyncio.to_thread(_without_bwrap, python, "bwrap: disabled by configuration", user)
    global _lock
    if _lock is None:
        _lock = asyncio.Lock()
    bwrap = shutil.which("bwrap")
    key = (python, bwrap, user)
    async with _lock:
        if key not in _cache:
            _cache[key] = await asyncio.to_thread(_probe, python, bwrap, user)
            for reason in _cache[key].missing:
                _log.warning("sandbox isolation layer missing", reason=reason)
    result = _cache[key]
    if use_bwrap and result.bwrap is None:
        raise RuntimeError(f"bwrap is required by configuration but unusable: {'; '.join(result.missing)}")
    return result


def _run_as(command: list[str], user: tuple[int, int] | None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        command,
        capture_output=True,
        timeout=_PROBE_TIMEOUT,
        check=False,
        env={},
        cwd="/",
        user=None if user is None else user[0],
        group=None if user is None else user[1],
        extra_groups=None if user is None else [],
    )


def _probe(python: str, bwrap: str | None, user: tuple[int, int] | None) -> Probe:
    _warm_bytecode()
    if bwrap is None:
        return _without_bwrap(python, "bwrap: not installed (apt-get install bubblewrap)", user)
    # Most isolating first: every namespace with the network one and nested user namespaces locked, then
    # each thing the kernel may refuse dropped in turn (what is dropped is reported, never silent).
    attempts = [
        (_NAMESPACES + _NETWORK, True),
        (_NAMESPACES + _NETWORK, False),
        (_NAMESPACES[1:] + _NETWORK, False),
        (_NAMESPACES, True),
        (_NAMESPACES, False),
        (_NAMESPACES[1:], False),
    ]
    errors: list[str] = []
    code = "import protofly.sandbox.host"
    if user is not None:
        # Root: bwrap runs as root (it can bind what only root may open), without a user namespace, and
        # the host drops to the sandbox user itself before it does anything else.
        attempts = [(_NAMESPACES[1:] + _NETWORK, False), (_NAMESPACES[1:], False)]
        code = f"from protofly.sandbox import confine; confine.drop_user({user[0]}, {user[1]}); {code}"
    for namespaces, locked in attempts:
        trial = Probe(bwrap, namespaces, user=user, userns_locked=locked)
        command = bwrap_command(bwrap, namespaces, python, ["-c", code], containment=containment_options(trial))
        try:
            done = _run_as(command, None)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if done.returncode == 0:
            missing = list(_refused_layers(namespaces, errors, root=user is not None))
            if user is None and "--unshare-user" in namespaces and not locked:
                missing.append(f"nested user namespaces: bwrap --disable-userns unusable ({errors[-1]})")
            return Probe(bwrap, namespaces, tuple(missing), user=user, userns_locked=locked)
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        errors.append(lines[-1] if lines else f"exit code {done.returncode}")
    return Probe(None, (), (f"bwrap: present but unusable here ({errors[-1]})",), user=user)


def _without_bwrap(python: str, reason: str, user: tuple[int, int] | None) -> Probe:
    """No bwrap: the host opens the interpreter itself, so the sandbox user must be able to run it."""
    _warm_bytecode()
    missing = [reason]
    if user is not None:
        problem = _user_cannot_run(python, user)
        if problem:
            missing.append(f"unprivileged user: uid {user[0]} cannot run {python} ({problem}); stubs run as root")
            user = None
    return Probe(None, (), tuple(missing), user=user)


def _user_cannot_run(python: str, user: tuple[int, int]) -> str | None:
    """Why ``user`` cannot start the host with ``python`` (no bwrap to open the paths for it), or None."""
    try:
        done = _run_as([python, "-I", "-c", "import protofly.sandbox.host"], user)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def sandbox_user(name: str) -> tuple[tuple[int, int] | None, str | None]:
    """Who a host runs as: ``(uid, gid)`` for a root runtime, and what is missing (a reason) or None.

    A runtime started as a normal user runs its hosts as itself (it cannot do otherwise, and its uid is
    unprivileged already).  Root runs them as ``name`` (a user name or a number); an empty ``name`` keeps
    root, which is reported as a missing layer.  Raises ``ValueError`` for a user that does not exist or
    is root.
    """
    if os.geteuid() != 0:
        return None, None
    if not name:
        return None, "unprivileged user: disabled by configuration (stubs run as the runtime's root)"
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise ValueError(f"sandbox_user: no user {name!r} on this machine") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ValueError(f"sandbox_user: {name!r} is root (uid or gid 0); name an unprivileged user")
    return (entry.pw_uid, entry.pw_gid), None


def _refused_layers(namespaces: tuple[str, ...], errors: list[str], *, root: bool) -> tuple[str, ...]:
    """The layers the working profile lacks, each with the kernel's reason (never dropped silently).

    A root runtime uses no user namespace by design (its hosts drop to an unprivileged user instead).
    """
    missing = []
    if "--unshare-user" not in namespaces and not root:
        missing.append(f"user namespace: refused by the kernel ({errors[0]})")
    if not set(_NETWORK) <= set(namespaces):
        missing.append(f"network namespace: refused by the kernel ({errors[-1]}); the stub shares the host's network")
    return tuple(missing)


def _warm_bytecode() -> None:
    """Compile the host's modules here, since inside bwrap the package directory is read-only."""
    import importlib

    for name in ("protofly.sandbox.host", "protofly.sandbox.confine", "protofly.sandbox.loader", "protofly.stub"):
        importlib.import_module(name)


def read_paths() -> list[str]:
    """What a stub may read: the interpreter's prefixes, protofly's import root, and the /etc subset.

    Worked out once per process (~100 path resolutions, 1.5 ms): every host start needs it twice, on the
    event loop, and the interpreter's, protofly's and Node's locations do not move while the runtime runs.
    """
    return list(_read_paths())


@functools.cache
def _read_paths() -> tuple[str, ...]:
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding the protofly package
    paths = ["/usr", sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix, package_root]
    executable = str(Path(sys.executable).resolve().parent)
    paths.append(executable)
    paths += _javascript_paths()
    unique: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.exists(real) and not any(_within(real, p) for p in unique):
            unique = [p for p in unique if not _within(p, real)]
            unique.append(real)
    # /etc entries keep their own name: a symlinked resolv.conf must appear where the resolver looks.
    return (*unique, *(path for path in _ETC if os.path.exists(path)))


def _javascript_paths() -> list[str]:
    """Node.js and the pinned JavaScript packages, which a host hands a JavaScript stub to (node_exec)."""
    from protofly.sandbox.node import node_read_paths

    return node_read_paths()


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def bwrap_command(
    bwrap: str,
    namespaces: tuple[str, ...],
    python: str,
    args: list[str],
    *,
    containment: list[str] | None = None,
    tmp_bytes: int | None = None,
) -> list[str]:
    """The bwrap command line that runs ``python -I <args>`` under the profile of the module doc.

    ``containment``: :func:`containment_options` (user, nested user namespaces, the hold for the cgroup);
    ``tmp_bytes``: the size of ``/tmp``.
    """
    command = [bwrap, "--die-with-parent", "--new-session", *namespaces, "--cap-drop", "ALL", "--clearenv"]
    command += containment or []
    for key, value in host_env("/tmp").items():
        command += ["--setenv", key, value]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
    # The private /tmp first: a checkout or virtualenv that lives under /tmp is bound on top of it below.
    command += ["--proc", "/proc", "--dev", "/dev", *_tmp_size(tmp_bytes), "--tmpfs", "/tmp"]
    paths = read_paths()
    command += _traversable_parents(paths)
    for path in paths:
        command += ["--ro-bind", path, path]
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.isdir(top) and not os.path.islink(top):
            command += ["--ro-bind", top, top]
    command += ["--chdir", "/tmp"]
    return [*command, "--", python, "-I", *args]


def containment_options(found: Probe, block_fd: int | None = None) -> list[str]:
    """The unprivileged user, no nested user namespace, and the hold until the cgroup placement."""
    options: list[str] = []
    if found.host_drops is not None:
        # Root's bwrap: the host keeps only what it needs to become the sandbox user (it drops both then).
        options += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    if found.user_namespace:
        options += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        if found.userns_locked:
            options += list(_USERNS_LOCK)
    if block_fd is not None:
        options += ["--block-fd", str(block_fd)]
    return options


def _traversable_parents(paths: list[str]) -> list[str]:
    """``--perms 0755 --dir`` for every parent bwrap makes on the way to a bind (root's bwrap makes them 0700,
    which the host cannot enter once it has dropped to the sandbox user)."""
    options: list[str] = []
    made: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        chain: list[str] = []
        while parent not in ("/", "", "/tmp") and parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            made.add(directory)
            options += ["--perms", "0755", "--dir", directory]
    return options


def _tmp_size(tmp_bytes: int | None) -> list[str]:
    """bwrap's ``--size`` (0.5+) for the ``--tmpfs`` that follows: the private /tmp is not host RAM at will;
    and ``--perms 1777``, so that a host that became the sandbox user after bwrap made it can write there."""
    size = [] if tmp_bytes is None else ["--size", str(tmp_bytes)]
    return ["--perms", "1777", *size]


def host_env(workdir: str) -> dict[str, str]:
    """The whole environment of a host: nothing of the runtime's, only what a stub needs."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        # Each thread's malloc arena reserves 64 MiB of address space, which RLIMIT_AS would count.
        "MALLOC_ARENA_MAX": "2",
    }
