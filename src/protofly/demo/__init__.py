"""The embedded demo: two domains on 127.0.0.1, two runtimes, stubs deployed on the fly."""

from __future__ import annotations

from protofly.demo.world import LocalDomain, LocalDomains, stubs_dir

__all__ = ["LocalDomain", "LocalDomains", "stubs_dir"]
