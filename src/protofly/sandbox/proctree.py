"""The process tree of one sandbox host, and its reaping.

A host is ``bwrap`` → ``bwrap`` (pid 1 of the new pid namespace) → ``python -m protofly.sandbox.host``, or
the host alone without bwrap.  Only the outer process is our child; :class:`HostProcess` owns it: it
starts it in its own session, watches its exit through a pidfd (so a crash is noticed at once, and a
recycled pid is never signalled), signals the whole tree nearest-last, and reaps.  At interpreter exit
any host still running is killed and reaped (:func:`_reap_leftovers`), so no process outlives the runtime.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

from protofly.sandbox.host import EXIT_MEMORY
from protofly.tasks import TaskSet

__all__ = ["HostProcess", "descendants", "describe_exit", "tree"]

#: Every host process not yet reaped, so that interpreter exit can kill and reap them.
_LIVE: set[HostProcess] = set()


def describe_exit(returncode: int, *, bwrap: bool) -> str:
    """The reason a host ended, from its exit status ("killed by SIGKILL", "exit code 3", ...).

    bwrap reports a child killed by signal N as exit code 128+N, so under bwrap those codes are read as
    signals.
    """
    if returncode < 0:
        return _signal_reason(-returncode)
    if bwrap and 128 < returncode < 128 + 65:
        return _signal_reason(returncode - 128)
    if returncode == EXIT_MEMORY:
        return "memory limit (MemoryError)"
    return f"exit code {returncode}"


def _signal_reason(number: int) -> str:
    if number == signal.SIGXCPU:
        return "CPU limit exceeded (SIGXCPU)"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"killed by {name}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (bwrap's helpers and the host), read from /proc, nearest first."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop(0)
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                children = [int(x) for x in handle.read().split()]
        except (OSError, ValueError):
            continue
        found.extend(children)
        queue.extend(children)
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, nearest first (what a cgroup placement sweeps)."""
    return _descendants(pid)


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (what a stub's resource usage is summed over)."""
    return [pid, *_descendants(pid)]


def _signal_pid(pid: int, sig: int) -> None:
    """Signal a process that is not our child through a pidfd, so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


class HostProcess:
    """One host's process tree: started, watched, signalled and reaped; ``on_exit(returncode)`` once."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        pass_fds: tuple[int, ...],
        bwrap: bool,
        user: tuple[int, int] | None = None,
        tasks: TaskSet,
        on_exit: Callable[[int], None],
    ) -> None:
        """Fork and exec ``command`` (raises ``OSError``), then watch its exit.

        ``user`` (uid, gid) is who the process runs as (a root runtime's unprivileged sandbox user): the
        ids are switched and the supplementary groups emptied in the child before the exec.

        Deliberately on the event loop's thread, as asyncio's own subprocess support does:
        PR_SET_PDEATHSIG and bwrap's --die-with-parent fire when the *thread* that forked exits, and the
        loop's thread lives as long as the runtime, unlike an executor's worker.  The fork is a vfork.
        """
        self.bwrap = bwrap
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._on_exit: Callable[[int], None] | None = on_exit
        self._exited = asyncio.Event()
        self._pidfd: int | None = None
        self.popen: subprocess.Popen[bytes] = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
            env=dict(env),
            cwd=cwd,
            user=None if user is None else user[0],
            group=None if user is None else user[1],
            extra_groups=None if user is None else [],
        )
        self.pid = self.popen.pid
        _LIVE.add(self)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            tasks.spawn(self._poll_exit(), name=f"poll host {self.pid}")
        else:
            self._loop.add_reader(self._pidfd, self.poll)

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def _poll_exit(self) -> None:
        """Fallback for kernels without pidfd: poll the child every 20 ms."""
        while not self._exited.is_set():
            self.poll()
            await asyncio.sleep(0.02)

    def poll(self) -> None:
        """Reap the child if it has exited, and then report it (once)."""
        if self._exited.is_set():
            return
        returncode = self.popen.poll()
        if returncode is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.returncode = returncode
        _LIVE.discard(self)
        self._exited.set()
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            on_exit(returncode)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the exit; True once it is reaped."""
        if self._exited.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def signal_tree(self, sig: int) -> None:
        """Signal the host and bwrap's helpers (nearest last), then our child's process group."""
        if self._exited.is_set():
            return
        for child in reversed(_descendants(self.pid)):
            _signal_pid(child, sig)
        if sig == signal.SIGKILL or not self.bwrap:
            # Our child is a zombie at worst until reaped, so its pid (and group id) cannot be recycled.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the tree synchronously; the reap follows through the pidfd (or now, if already done)."""
        self.signal_tree(signal.SIGKILL)
        self.poll()

    def reap_at_exit(self) -> None:
        """Interpreter exit: kill and reap without an event loop."""
        self.signal_tree(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=2.0)


@atexit.register
def _reap_leftovers() -> None:
    for host in list(_LIVE):
        host.reap_at_exit()
