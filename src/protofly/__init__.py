"""protofly: a Python Hyperty Runtime core that deploys reTHINK protocol stubs on the fly.

The package's top level stays import-light (every stub sandbox imports ``protofly``): the runtime and its
configuration are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Runtime", "RuntimeConfig", "StubDeploymentError", "StubHandle", "__version__"]

if TYPE_CHECKING:
    from protofly.config import RuntimeConfig
    from protofly.runtime import Runtime, StubDeploymentError, StubHandle


def __getattr__(name: str) -> Any:
    if name == "RuntimeConfig":
        from protofly.config import RuntimeConfig

        return RuntimeConfig
    if name in ("Runtime", "StubDeploymentError", "StubHandle"):
        from protofly import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'protofly' has no attribute {name!r}")
