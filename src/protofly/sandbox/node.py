"""JavaScript stubs: which descriptors they are, where Node.js and its pinned packages are, what is missing.

reTHINK published every protocol stub as JavaScript; protofly runs them unmodified in a Node.js host
(``node_host.js``, beside this module) inside the same process sandbox as a Python stub.  This module is
the runtime's view of that capability, kept free of heavy imports because the sandbox host imports it:

* :func:`is_javascript` folds reTHINK's language spellings (``javascript``, ``"Javascript ECMA6"``, ...);
* :func:`node_executable` and :func:`node_modules` find Node.js and the ``npm ci``-installed packages
  (the pinned ``ws``, the stub's WebSocket on every Node version: it takes the runtime's brokered sockets);
* :func:`missing` says, with the install hint, why JavaScript stubs cannot run here, or None.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = [
    "EXIT_UNCAUGHT",
    "INSTALL_HINT",
    "NODE_HOST",
    "exit_reason",
    "host_pid",
    "is_javascript",
    "missing",
    "node_executable",
    "node_modules",
    "node_read_paths",
]

#: The host program: protofly's own, small and documented.
NODE_HOST = Path(__file__).with_name("node_host.js")
#: How to get what JavaScript stubs need (``make test`` and ``scripts/system-deps.sh`` do both).
INSTALL_HINT = "install Node.js (apt-get install nodejs npm), then run 'npm ci' in the protofly checkout"
#: The checkout's ``node_modules`` (package.json and package-lock.json live at its root).
_CHECKOUT_MODULES = Path(__file__).resolve().parents[3] / "node_modules"
_JS_KEYS = frozenset({"js", "ecmascript", "node", "nodejs", "node_js"})


def is_javascript(language: str) -> bool:
    """True for reTHINK's JavaScript spellings: ``javascript``, ``Javascript ECMA6``, ``ECMAScript``, ``js``."""
    key = re.sub(r"[\s\-.]+", "_", language.strip().lower())
    return key.startswith(("javascript", "ecmascript")) or key in _JS_KEYS


def node_executable() -> str | None:
    """The Node.js interpreter on ``PATH`` (Debian names it ``node``; old packages ``nodejs``), or None."""
    for name in ("node", "nodejs"):
        found = shutil.which(name)
        if found:
            return os.path.realpath(found)
    return None


def node_modules() -> str | None:
    """The directory holding the pinned JavaScript packages, if they are installed."""
    return str(_CHECKOUT_MODULES) if (_CHECKOUT_MODULES / "ws").is_dir() else None


def node_read_paths() -> list[str]:
    """What a JavaScript stub's host must read besides the Python host's paths: Node and its packages."""
    paths = []
    node = node_executable()
    if node is not None:
        paths.append(str(Path(node).parent))
    modules = node_modules()
    if modules is not None:
        paths.append(modules)
    return paths


def missing(language: str) -> str | None:
    """Why a stub in ``language`` cannot run in the process sandbox here (with the install hint), or None."""
    if not is_javascript(language):
        return None
    if node_executable() is None:
        return f"missing capability: Node.js is not installed, so JavaScript stubs cannot run ({INSTALL_HINT})"
    return None


#: What V8 writes to stderr before it aborts on exhausted memory (heap limit, or RLIMIT_DATA under it).
_OUT_OF_MEMORY = ("JavaScript heap out of memory", "Allocation failed", "Fatal process out of memory")


#: node_host.js's exit code after an uncaught exception in the stub (its ``EXIT_CRASH``).
EXIT_UNCAUGHT = 70


def exit_reason(reason: str, stderr_lines: list[str]) -> str:
    """A Node host's exit in the runtime's words, from its exit status (the stub's own words are only logged).

    V8 aborts (SIGABRT) when a stub exhausts its memory, after writing so on stderr; the stub itself has
    no ``process`` to abort or exit with.  Exit code 70 is the host's own after an uncaught exception.
    """
    if reason in ("killed by SIGABRT", "killed by SIGTRAP") and any(
        marker in line for line in stderr_lines for marker in _OUT_OF_MEMORY
    ):
        return "memory limit (JavaScript heap out of memory)"
    if reason == f"exit code {EXIT_UNCAUGHT}":
        return f"uncaught exception in the stub (exit code {EXIT_UNCAUGHT})"
    return reason


def host_pid(root: int) -> int | None:
    """The Node.js process at or below ``root`` (a sandbox host, with bwrap's helpers in between), or None."""
    node = node_executable()
    queue = [root]
    while queue:
        pid = queue.pop(0)
        try:
            if os.readlink(f"/proc/{pid}/exe") == node:
                return pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        queue.extend(int(child) for child in children)
    return None
