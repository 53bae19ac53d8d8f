"""A runtime run as an unprivileged user created for the test session (the CI machine runs tests as root).

The user needs an interpreter, protofly and its dependencies it can read: a checkout or virtualenv under
``/root`` (0700) is out of its reach.  :func:`readable_environment` therefore builds one in a fresh
0755 temporary directory: a ``--without-pip`` virtualenv over an interpreter the user can run, with
protofly's source and the files of its runtime dependencies (from this virtualenv's metadata) copied in,
and bytecode compiled ahead (the user could not write it there).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SRC = Path(__file__).resolve().parents[3] / "src" / "protofly"
SCRIPT = Path(__file__).with_name("as_user_runtime.py")


def create_user() -> Iterator[pwd.struct_passwd]:
    """A system user (and group) of its own for this session, removed afterwards; skips if impossible."""
    if os.geteuid() != 0:
        pytest.skip("creating the test user needs root (a runtime run as a normal user is every other test)")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot run a runtime as a created user")
    name = f"pftest{os.getpid()}"
    made = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]


def _runs_as(user: pwd.struct_passwd, python: str, code: str = "pass") -> str | None:
    done = subprocess.run([*as_user(user), python, "-c", code], capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


def _dependencies(name: str, seen: set[str]) -> None:
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = requirement.name.lower()
        if key not in seen:
            seen.add(key)
            _dependencies(requirement.name, seen)


def readable_environment(user: pwd.struct_passwd) -> Iterator[Path]:
    """An interpreter (``<root>/venv/bin/python``) that can import protofly when run as ``user``."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [f"/usr/bin/{version}", os.path.realpath(getattr(sys, "_base_executable", sys.executable))]
    base = next((c for c in candidates if os.path.exists(c) and _runs_as(user, c) is None), None)
    if base is None:
        pytest.skip(f"no {version} interpreter that user {user.pw_name} may run ({', '.join(candidates)})")
    root = Path(tempfile.mkdtemp(prefix="protofly-as-user-"))
    try:
        root.chmod(0o755)
        subprocess.run([base, "-m", "venv", "--without-pip", str(root / "venv")], check=True, capture_output=True)
        site = root / "venv" / "lib" / version / "site-packages"
        names: set[str] = set()
        _dependencies("protofly", names)
        for name in sorted(names):
            distribution = metadata.distribution(name)
            for file in distribution.files or []:
                source = Path(str(distribution.locate_file(file)))
                if source.is_file() and "__pycache__" not in file.parts and not str(file).startswith(".."):
                    target = site / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target)
        shutil.copytree(SRC, root / "src" / "protofly", ignore=shutil.ignore_patterns("__pycache__"))
        (site / "protofly-src.pth").write_text(f"{root / 'src'}\n")
        shutil.copy2(SCRIPT, root / SCRIPT.name)
        python = root / "venv" / "bin" / "python"
        subprocess.run([str(python), "-m", "compileall", "-q", str(root / "src"), str(site)], check=False)
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        problem = _runs_as(user, str(python), "import protofly.runtime, protofly.sandbox.host")
        if problem is not None:
            pytest.skip(f"the copied environment does not import as {user.pw_name}: {problem}")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
