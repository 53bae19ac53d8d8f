"""Sandboxes: where stub code runs, isolated from the runtime and from other stubs.

The interface the Runtime UA uses lives here: :class:`Sandbox` deploys a component from source bytes and
returns a :class:`Component`, to which the runtime posts messages and from which it receives the stub's
messages (after boundary checks) and, if the process dies, a ``failed`` status and one ``on_exit`` call.

Implementations:

* :class:`~protofly.sandbox.process.ProcessSandbox` (the default): one OS process per stub, scrubbed
  environment, private working directory, rlimits, bubblewrap namespaces where available, Landlock and
  seccomp inside; see ``docs/sandbox.md``.
* :class:`~protofly.sandbox.inprocess.InProcessSandbox`: the same protocol in the runtime's own process, for
  trusted code and fast tests.

This package's ``__init__`` is also imported inside every sandbox host process (``python -I -m
protofly.sandbox.host``), so it stays light: the implementations are loaded on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protofly.sandbox.limits import DEFAULT_LIMITS, LimitError, Limits, SandboxLimits

if TYPE_CHECKING:
    from protofly.message import Message
    from protofly.sandbox.broker import EgressPolicy
    from protofly.sandbox.inprocess import InProcessSandbox
    from protofly.sandbox.process import ProcessSandbox

__all__ = [
    "DEFAULT_LIMITS",
    "Boundary",
    "Component",
    "DeployError",
    "InProcessSandbox",
    "LimitError",
    "Limits",
    "ProcessSandbox",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "active_layers",
    "create_sandbox",
]


@dataclass(frozen=True)
class Boundary:
    """What a stub may claim as ``from``: the runtime's own address space is not the stub's to use.

    A message is forged if its ``from`` lies within ``runtime_url`` (other than the stub's own URL and its
    status URL), or ``is_local(from)`` says it is one of the runtime's local components, or the stub
    serves a foreign domain and ``from`` is served by the runtime's own domain.
    """

    runtime_url: str  # hyperty-runtime://a.test/<id>
    runtime_domain: str  # a.test
    stub_domain: str  # the domain the stub serves, e.g. b.test
    is_local: Callable[[str], bool] | None = None
    #: Changes whenever ``is_local``'s answers may change (a local component came or went), so that the
    #: guard may keep the senders it cleared until then; None with an ``is_local``: nothing is kept.
    local_version: Callable[[], int] | None = None


def active_layers(isolation: Mapping[str, Any]) -> list[str]:
    """The names of the layers a :attr:`Component.isolation` record says are active (a truthy value).

    ``host`` is not a layer: it names the program that runs the stub (``python`` or ``node``).
    """
    return [name for name, value in isolation.items() if value and name not in ("missing", "host")]


class SandboxError(Exception):
    """A sandbox operation that cannot be done (closed sandbox, component no longer running, ...)."""


class DeployError(SandboxError):
    """Deploying a stub failed; ``summary`` is one line such as ``"SyntaxError: invalid syntax (stub.py, line 3)"``."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary


class Component(ABC):
    """One deployed stub, as the runtime sees it."""

    url: str
    pid: int | None
    #: What isolation is ACTIVE, and under ``missing`` what is not and why (never silently degraded).
    isolation: dict[str, Any]
    #: Boundary counters: ``oversized_frames``, ``invalid_frames``, ``forged_from``, ``dropped_to_stub``, ...
    counters: dict[str, int]

    @abstractmethod
    def post(self, msg: Message) -> bool:
        """Runtime → stub.  Never blocks: messages are buffered and sent in batches.

        Returns False, and counts ``dropped_to_stub``, when the message was not taken (the component is not
        running, or the stub has left too much of its channel unread): the caller must then answer the
        sender, so that nothing is dropped silently.
        """

    @abstractmethod
    async def execute(self, method: str, params: list[Any] | None = None, *, timeout: float) -> Message:
        """Run ``connect`` (params ``[credentials]``), ``disconnect``, ``init``, ... and return the response.

        Raises ``TimeoutError`` when no response comes in time and :class:`SandboxError` when the component
        is not running.
        """

    @abstractmethod
    async def remove(self, grace: float = 2.0) -> None:
        """Ask the stub to disconnect, wait up to ``grace``, then terminate, then kill; always reaps."""

    def deploy_parts(self) -> dict[str, float]:
        """How the deploy's time was spent, in milliseconds per part (the deploy timeline's detail of its
        ``sandbox`` step); empty where the sandbox does not break it down."""
        return {}

    def usage(self) -> dict[str, Any] | None:
        """What the stub's process tree uses now, as its cgroup accounts it: ``memory_bytes``,
        ``memory_peak_bytes``, ``cpu_seconds``, ``processes``; None where there is no cgroup to ask."""
        return None

    async def ping(self, timeout: float) -> dict[str, Any] | None:
        """Ask the stub's event loop for a sign of life; its answer (the SDK's, see :func:`protofly.stub.pong`).

        None: this sandbox cannot tell (an in-process stub shares the runtime's loop).  Raises
        ``TimeoutError`` when no answer comes within ``timeout`` and :class:`SandboxError` when the component
        is not running.
        """
        return None

    def kill_unresponsive(self, detail: str) -> None:
        """End a stub whose loop does not answer; its exit is then reported as ``unresponsive: <detail>``."""
        raise SandboxError(f"this sandbox cannot end an unresponsive stub ({detail})")


class Sandbox(ABC):
    """Deploys components; one implementation per isolation strategy."""

    kind: str

    @abstractmethod
    async def deploy(
        self,
        *,
        url: str,
        source: bytes,
        config: dict[str, Any],
        classname: str | None,
        limits: Limits | None,
        boundary: Boundary,
        on_message: Callable[[Message], None],
        on_exit: Callable[[str], None],
        egress: EgressPolicy | None = None,
        language: str = "python",
    ) -> Component:
        """Run ``source`` as the stub at ``url``; raises :class:`DeployError` if it cannot be started.

        ``egress`` is what the stub may connect to through ``open_connection`` (its descriptor's endpoints
        and the runtime's resolver map); None: nothing.
        """

    def unavailable(self, language: str) -> str | None:
        """Why stubs in ``language`` (a descriptor's ``language``) cannot run here, or None if they can."""
        if language.strip().lower() in ("python", "python3"):
            return None
        return f"stub language {language!r} cannot run in the {self.kind} sandbox"

    @abstractmethod
    async def close(self) -> None:
        """Remove every component this sandbox still runs (idempotent)."""

    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op for sandboxes with nothing to prepare
        """Prepare ahead of the first deploy (probe the isolation layers, pre-start hosts); optional."""

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def create_sandbox(kind: str = "process", **options: Any) -> Sandbox:
    """The sandbox named by configuration: ``process`` (default) or ``in-process``."""
    if kind == "process":
        from protofly.sandbox.process import ProcessSandbox

        return ProcessSandbox(**options)
    if kind in ("in-process", "inprocess"):
        from protofly.sandbox.inprocess import InProcessSandbox

        return InProcessSandbox(**options)
    raise ValueError(f"sandbox kind must be 'process' or 'in-process', got {kind!r}")


def __getattr__(name: str) -> Any:
    """Load the implementations lazily, so that the sandbox host does not import them."""
    if name == "ProcessSandbox":
        from protofly.sandbox.process import ProcessSandbox

        return ProcessSandbox
    if name == "InProcessSandbox":
        from protofly.sandbox.inprocess import InProcessSandbox

        return InProcessSandbox
    raise AttributeError(f"module 'protofly.sandbox' has no attribute {name!r}")
