"""The runtime's view of JavaScript stubs: which languages they are, what is missing, how a Node host ended."""

from __future__ import annotations

import pytest

from protofly.sandbox import InProcessSandbox
from protofly.sandbox.node import INSTALL_HINT, exit_reason, is_javascript, missing
from protofly.sandbox.node_exec import heap_limit_mb
from protofly.sandbox.process import ProcessSandbox


@pytest.mark.parametrize(
    "language", ["javascript", "JavaScript", "Javascript ECMA6", "javascript-ecma5", "ECMAScript 2015", "js", "node.js"]
)
def test_rethinks_javascript_spellings_are_javascript(language: str) -> None:
    assert is_javascript(language)


@pytest.mark.parametrize("language", ["python", "Python3", "java", "jsx", ""])
def test_other_languages_are_not(language: str) -> None:
    assert not is_javascript(language)


def test_without_node_javascript_is_a_missing_capability_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = missing("Javascript ECMA6")
    assert problem is not None and problem.startswith("missing capability: Node.js is not installed")
    assert INSTALL_HINT in problem
    assert missing("python") is None
    assert ProcessSandbox().unavailable("javascript") == problem


def test_each_sandbox_says_which_languages_it_cannot_run() -> None:
    assert ProcessSandbox().unavailable("python") is None
    assert ProcessSandbox().unavailable("cobol") == "stub language 'cobol' cannot run in the process sandbox"
    in_process = InProcessSandbox()
    assert in_process.unavailable("Python") is None
    assert in_process.unavailable("javascript") == "stub language 'javascript' cannot run in the in-process sandbox"


def test_a_v8_out_of_memory_abort_is_reported_as_the_memory_limit() -> None:
    stderr = [
        "<--- Last few GCs --->",
        "FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory",
    ]
    assert exit_reason("killed by SIGABRT", stderr) == "memory limit (JavaScript heap out of memory)"
    assert exit_reason("killed by SIGABRT", ["something else"]) == "killed by SIGABRT"
    assert exit_reason("CPU limit exceeded (SIGXCPU)", stderr) == "CPU limit exceeded (SIGXCPU)"
    assert exit_reason("exit code 70", []) == "uncaught exception in the stub (exit code 70)"


def test_the_v8_heap_limit_is_three_quarters_of_the_memory_limit_and_never_tiny() -> None:
    assert heap_limit_mb(1024) == 768
    assert heap_limit_mb(8) == 16
