"""Turning verified source bytes into a running stub instance, and driving it with ``execute``.

Shared by the process host (inside the sandbox) and the in-process sandbox, so both accept exactly the same
stubs and report the same errors.  The source is executed as a fresh module (never imported from a path),
then the instance is made in the first way that applies:

1. the class named by the descriptor's ``sourceCodeClassname``, called as ``cls(url, bus, config)``;
2. the reTHINK contract ``activate(url, bus, config)`` returning ``{"name", "instance"}`` or the instance;
3. the module's only :class:`~protofly.stub.ProtoStub` subclass.

Any exception on the way (``SyntaxError`` included) becomes a :class:`LoadError` whose ``summary`` is the
one-line ``"Type: text"`` form the runtime shows to its user.
"""

from __future__ import annotations

import inspect
import linecache
import sys
import types
from collections.abc import Mapping
from typing import Any

from protofly.stub import Bus, ProtoStub, call_public, summary

__all__ = ["STUB_FILENAME", "LoadError", "execute", "load"]

#: The file name stub code runs under: tracebacks and ``SyntaxError`` texts name it.
STUB_FILENAME = "stub.py"


class LoadError(Exception):
    """The stub's code could not be executed or activated; ``summary`` is ``"SyntaxError: ..."`` etc."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary


async def load(
    source: bytes | str,
    *,
    url: str,
    config: Mapping[str, Any],
    classname: str | None,
    bus: Bus,
    module_name: str = "stub",
    filename: str = STUB_FILENAME,
) -> object:
    """Execute ``source`` as module ``module_name`` and return the stub instance (see the module doc).

    ``filename`` is the name its code runs under and its key in :mod:`linecache`, so it must be unique
    among the stubs of one process: the in-process sandbox gives each stub its own
    (``<module>/stub.py``, whose ``SyntaxError`` texts still say ``stub.py``) and forgets it on removal.
    """
    text = _text(source)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    # Registered so that dataclasses, pickle and typing can find the module of the stub's classes, and
    # in linecache so that tracebacks show the stub's lines.
    sys.modules[module_name] = module
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)
    try:
        code = compile(text, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)
        instance = _instantiate(module, url, bus, dict(config), classname)
        if inspect.isawaitable(instance):
            instance = await instance
        return _unwrap(instance)
    except LoadError:
        sys.modules.pop(module_name, None)
        raise
    except MemoryError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise LoadError(summary(exc)) from None


def _text(source: bytes | str) -> str:
    if isinstance(source, str):
        return source
    try:
        return bytes(source).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(
            f"UnicodeDecodeError: stub source is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _instantiate(module: types.ModuleType, url: str, bus: Bus, config: dict[str, Any], classname: str | None) -> Any:
    namespace = module.__dict__
    if classname:
        cls = namespace.get(classname)
        if isinstance(cls, type):
            return cls(url, bus, config)
    activate = namespace.get("activate")
    if callable(activate):
        return activate(url, bus, config)
    if classname:
        raise LoadError(f"NameError: the stub defines neither class {classname!r} nor activate(url, bus, config)")
    candidates = [
        value
        for value in namespace.values()
        if isinstance(value, type) and issubclass(value, ProtoStub) and value.__module__ == module.__name__
    ]
    if len(candidates) == 1:
        return candidates[0](url, bus, config)
    raise LoadError(
        "NameError: the stub defines no activate(url, bus, config), names no sourceCodeClassname, and has "
        f"{len(candidates)} ProtoStub subclasses instead of exactly one"
    )


def _unwrap(result: Any) -> object:
    """reTHINK's ``activate`` returns ``{"name": ..., "instance": ...}``; accept the bare instance too."""
    if isinstance(result, Mapping):
        instance = result.get("instance")
        if instance is None:
            raise LoadError("TypeError: activate() returned a mapping without an 'instance'")
        return instance
    if result is None:
        raise LoadError("TypeError: activate() returned None instead of the stub instance")
    return result


async def execute(instance: object, method: str, params: list[Any]) -> Any:
    """Run ``method`` on the stub; raises :class:`~protofly.stub.MethodNotFound` for unknown methods."""
    if not isinstance(params, list):
        raise TypeError(f"params must be a list, got {type(params).__name__}")
    if isinstance(instance, ProtoStub):
        return await instance.handle_execute(method, params)
    if method == "init" and not callable(getattr(instance, "init", None)):
        return None
    return await call_public(instance, method, params)
