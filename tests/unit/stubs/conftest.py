"""Load the message node stub's source the way a sandbox does: as a module from its file, not a package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

STUB_FILE = Path(__file__).resolve().parents[3] / "stubs" / "msgnode" / "stub.py"


def load_msgnode_stub() -> ModuleType:
    name = "protofly_test_msgnode_stub"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, STUB_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mn() -> ModuleType:
    return load_msgnode_stub()
