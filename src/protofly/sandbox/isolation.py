"""The runtime side of process isolation: which layers this machine offers, and the command that uses them.

One probe per interpreter (cached for the life of the runtime) finds out whether ``bwrap`` is installed and
which namespace options work here (a user namespace is tried first and dropped only if the kernel refuses
it).  The probe runs the real interpreter under the real profile, so a profile that cannot start Python is
found once, at start-up, with bwrap's own error text, and not at every deploy.

Profile: new user/pid/ipc/uts/cgroup namespaces, the network shared
(stubs connect to message nodes, e.g. on 127.0.0.1), every capability dropped, the environment cleared,
``/usr``, the Python prefixes and the directory protofly is imported from bound read-only, a few ``/etc``
files a network client needs (resolver, CA certificates), a fresh ``/proc`` and ``/dev``, and a private
tmpfs on ``/tmp`` as the working directory; ``--die-with-parent`` and ``--new-session``.

A layer that is not available is never skipped silently: it is returned under ``missing`` with the
reason, logged as a warning and recorded in every component's ``isolation``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protofly.log import get_logger

__all__ = ["Probe", "bwrap_command", "host_env", "probe", "read_paths"]

_log = get_logger("protofly.sandbox.isolation")

#: Namespace options, most isolating first; ``--unshare-user`` is the one a kernel may refuse.
_NAMESPACES = ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try")
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


@dataclass(frozen=True)
class Probe:
    """What process isolation this machine offers (the result of :func:`probe`)."""

    bwrap: str | None  # path of a working bwrap, or None
    namespaces: tuple[str, ...] = ()  # bwrap options that work here
    missing: tuple[str, ...] = field(default=())

    @property
    def namespace_names(self) -> list[str]:
        return [opt.removeprefix("--unshare-").removesuffix("-try") for opt in self.namespaces]


_cache: dict[tuple[str, str | None], Probe] = {}
_lock: asyncio.Lock | None = None


async def probe(python: str = sys.executable, *, use_bwrap: bool | None = None) -> Probe:
    """Find out once which layers work for ``python`` (``use_bwrap``: None = if present, False = never)."""
    if use_bwrap is False:
        return Probe(None, (), ("bwrap: disabled by configuration",))
    global _lock
    if _lock is None:
        _lock = asyncio.Lock()
    bwrap = shutil.which("bwrap")
    key = (python, bwrap)
    async with _lock:
        if key not in _cache:
            _cache[key] = await asyncio.to_thread(_probe, python, bwrap)
            for reason in _cache[key].missing:
                _log.warning("sandbox isolation layer missing", reason=reason)
    result = _cache[key]
    if use_bwrap and result.bwrap is None:
        raise RuntimeError(f"bwrap is required by configuration but unusable: {'; '.join(result.missing)}")
    return result


def _probe(python: str, bwrap: str | None) -> Probe:
    _warm_bytecode()
    if bwrap is None:
        return Probe(None, (), ("bwrap: not installed (apt-get install bubblewrap)",))
    attempts = [_NAMESPACES, _NAMESPACES[1:]]
    errors: list[str] = []
    for namespaces in attempts:
        command = bwrap_command(bwrap, namespaces, python, ["-c", "import protofly.sandbox.host"])
        try:
            done = subprocess.run(command, capture_output=True, timeout=_PROBE_TIMEOUT, check=False, env={})
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if done.returncode == 0:
            missing = () if namespaces == _NAMESPACES else (f"user namespace: refused by the kernel ({errors[-1]})",)
            return Probe(bwrap, namespaces, missing)
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        errors.append(lines[-1] if lines else f"exit code {done.returncode}")
    return Probe(None, (), (f"bwrap: present but unusable here ({errors[-1]})",))


def _warm_bytecode() -> None:
    """Compile the host's modules here, since inside bwrap the package directory is read-only."""
    import importlib

    for name in ("protofly.sandbox.host", "protofly.sandbox.confine", "protofly.sandbox.loader", "protofly.stub"):
        importlib.import_module(name)


def read_paths() -> list[str]:
    """What a stub may read: the interpreter's prefixes, protofly's import root, and the /etc subset."""
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
    return unique + [path for path in _ETC if os.path.exists(path)]


def _javascript_paths() -> list[str]:
    """Node.js and the pinned JavaScript packages, which a host hands a JavaScript stub to (node_exec)."""
    from protofly.sandbox.node import node_read_paths

    return node_read_paths()


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def bwrap_command(bwrap: str, namespaces: tuple[str, ...], python: str, args: list[str]) -> list[str]:
    """The bwrap command line that runs ``python -I <args>`` under the profile of the module doc."""
    command = [bwrap, "--die-with-parent", "--new-session", *namespaces, "--cap-drop", "ALL", "--clearenv"]
    for key, value in host_env("/tmp").items():
        command += ["--setenv", key, value]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
    # The private /tmp first: a checkout or virtualenv that lives under /tmp is bound on top of it below.
    command += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in read_paths():
        command += ["--ro-bind", path, path]
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.isdir(top) and not os.path.islink(top):
            command += ["--ro-bind", top, top]
    command += ["--chdir", "/tmp"]
    return [*command, "--", python, "-I", *args]


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
