"""InProcessSandbox: stubs in the runtime's own process and event loop, for trusted code and fast tests.

It offers no isolation at all (no limits, no separate memory, the stub can reach everything the runtime
can) and says so: every component's ``isolation`` lists what is missing, and creating the sandbox logs a
warning.  What it does keep from the process sandbox is the contract: the same loader, the same stub
SDK, the same boundary checks and counters, the same size limit, and messages are copied across the
boundary (encoded and decoded), so that neither side can mutate the other's objects and a stub that
works here behaves the same in a process.
"""

from __future__ import annotations

import asyncio
import itertools
import linecache
import sys
from collections.abc import Callable
from typing import Any

from protofly.log import get_logger
from protofly.message import Message, MessageError, decode, encode, response
from protofly.sandbox import Boundary, Component, DeployError, Limits, Sandbox, SandboxError
from protofly.sandbox.channel import DEFAULT_MAX_FRAME, SANDBOX_EXTERNAL
from protofly.sandbox.guard import Guard, new_counters
from protofly.sandbox.loader import STUB_FILENAME, LoadError, execute, load
from protofly.stub import AuthenticationFailed, Bus, MethodNotFound, summary

__all__ = ["InProcessComponent", "InProcessSandbox"]

_log = get_logger("protofly.sandbox")
_module_numbers = itertools.count(1)

_MISSING = [
    "process: runs inside the runtime's process (in-process sandbox, trusted code only)",
    "rlimits: not enforceable in-process",
    "bwrap: not applicable in-process",
    "landlock: not applicable in-process",
    "seccomp: not applicable in-process",
    "env: the runtime's environment is visible",
]


class InProcessComponent(Component):
    """A stub instance living in the runtime's event loop."""

    def __init__(self, sandbox: InProcessSandbox, url: str, guard: Guard, module_name: str) -> None:
        self.url = url
        self.pid = None
        self.counters = guard.counters
        self.isolation: dict[str, Any] = {"process": False, "missing": list(_MISSING)}
        self.instance: object | None = None
        self._sandbox = sandbox
        self._guard = guard
        self._module_name = module_name
        #: The stub's own file name (and linecache key): tracebacks show its lines, not another stub's.
        self.filename = f"{module_name}/{STUB_FILENAME}"
        self._max_frame = sandbox.max_frame
        self._loop = asyncio.get_running_loop()
        self._bus = Bus(self._from_stub)
        self._removed = False

    def post(self, msg: Message) -> bool:
        if self._removed or self.instance is None:
            self.counters["dropped_to_stub"] += 1
            return False
        if msg.from_ == SANDBOX_EXTERNAL:
            raise MessageError(f"from: {SANDBOX_EXTERNAL} is reserved for the sandbox control protocol")
        copy = self._copy(msg)
        self.counters["messages_to_stub"] += 1
        self._loop.call_soon(self._dispatch, copy)
        return True

    def _dispatch(self, msg: Message) -> None:
        if not self._removed:
            self._bus.dispatch(msg)

    def _from_stub(self, msg: Message) -> None:
        """The stub's bus posts here: the same size limit and boundary check as across a process."""
        data = encode(msg)
        if len(data) > self._max_frame:
            raise MessageError(f"size: message of {len(data)} bytes is over the {self._max_frame}-byte frame limit")
        if self._removed:
            return
        copy = decode(data, max_size=self._max_frame)
        self._loop.call_soon(self._guard.from_stub, copy)

    def _copy(self, msg: Message) -> Message:
        data = encode(msg)
        if len(data) > self._max_frame:
            raise MessageError(f"size: message of {len(data)} bytes is over the {self._max_frame}-byte frame limit")
        return decode(data, max_size=self._max_frame)

    async def execute(self, method: str, params: list[Any] | None = None, *, timeout: float) -> Message:
        if self._removed or self.instance is None:
            raise SandboxError(f"component {self.url} is not running")
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        request = Message(
            id=0,
            type="execute",
            from_=SANDBOX_EXTERNAL,
            to=self.url,
            body={"method": method, "params": list(params or [])},
        )
        try:
            value = await asyncio.wait_for(execute(self.instance, method, list(params or [])), timeout)
        except MethodNotFound as exc:
            return response(request, 404, str(exc))
        except AuthenticationFailed as exc:
            return response(request, 401, summary(exc))
        except TimeoutError:
            raise
        except Exception as exc:
            return response(request, 500, summary(exc))
        return response(request, 200, value=value)

    async def remove(self, grace: float = 2.0) -> None:
        if self._removed:
            return
        if self.instance is not None:
            try:
                await asyncio.wait_for(execute(self.instance, "disconnect", []), max(grace, 0.001))
            except (Exception, TimeoutError) as exc:
                _log.debug("disconnect on removal failed", stub_url=self.url, error=summary(exc))
        self._removed = True
        await self._bus.close()
        sys.modules.pop(self._module_name, None)
        self._sandbox._forget(self)


class InProcessSandbox(Sandbox):
    """Runs stubs in the runtime's process; ``limits`` are accepted and recorded as not enforced."""

    kind = "in-process"

    def __init__(
        self, *, limits: Limits | None = None, max_frame: int = DEFAULT_MAX_FRAME, deploy_timeout: float = 15.0
    ) -> None:
        self.limits = limits  # recorded, never enforced: there is no process to limit
        self.max_frame = max_frame
        self.deploy_timeout = deploy_timeout
        self._components: set[InProcessComponent] = set()
        self._closed = False
        _log.warning("in-process sandbox: stubs run without isolation; use it for trusted code only")

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
        language: str = "python",
    ) -> InProcessComponent:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        problem = self.unavailable(language)
        if problem is not None:
            raise DeployError(problem)
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty string, got {url!r}")
        if not isinstance(boundary, Boundary):
            raise TypeError(f"boundary must be a Boundary, got {type(boundary).__name__}")
        if not isinstance(config, dict):
            raise DeployError(f"TypeError: config must be an object, got {type(config).__name__}")
        module_name = f"protofly_stub_{next(_module_numbers)}"
        component = InProcessComponent(self, url, Guard(url, boundary, on_message, new_counters()), module_name)
        self._components.add(component)
        try:
            component.instance = await asyncio.wait_for(
                load(
                    source,
                    url=url,
                    config=config,
                    classname=classname,
                    bus=component._bus,
                    module_name=module_name,
                    filename=component.filename,
                ),
                self.deploy_timeout,
            )
        except LoadError as exc:
            self._forget(component)
            raise DeployError(exc.summary) from None
        except TimeoutError:
            self._forget(component)
            raise DeployError(
                f"TimeoutError: the stub did not finish deploying within {self.deploy_timeout} s"
            ) from None
        except MemoryError:
            self._forget(component)
            raise DeployError("MemoryError: the stub ran out of memory while deploying") from None
        requested = limits if limits is not None else self.limits
        if requested is not None:
            component.isolation["requested_limits"] = requested.as_dict()
        return component

    def _forget(self, component: InProcessComponent) -> None:
        """A removed or failed component: drop it, and its source lines, so nothing grows per deploy."""
        self._components.discard(component)
        linecache.cache.pop(component.filename, None)

    async def close(self) -> None:
        self._closed = True
        components = list(self._components)
        await asyncio.gather(*(c.remove(0.5) for c in components), return_exceptions=True)
        self._components.clear()
