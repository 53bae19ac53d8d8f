"""protofly: a Python Hyperty Runtime core that deploys reTHINK protocol stubs on the fly."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
