"""A descriptor's ``sandbox`` limits reach the stub's process: checked from inside the stub."""

from __future__ import annotations

import json
from pathlib import Path

from protofly.catalogue import publish
from protofly.message import Message, response_code

STUBS_SRC = Path(__file__).resolve().parents[2] / "stubs_src"
MIB = 1 << 20


def publish_rlimits_stub(domains, domain: str, sandbox: dict[str, int]) -> None:
    """Sign and publish tests/stubs_src/rlimits.py as ``domain``'s default stub, asking for ``sandbox``."""
    package = domains.root / "packages" / f"{domain}-rlimits"
    package.mkdir(parents=True)
    (package / "stub.py").write_bytes((STUBS_SRC / "rlimits.py").read_bytes())
    template = {
        "objectName": "default",
        "version": "1.0.0",
        "language": "python",
        "sourceCodeClassname": "RlimitsStub",
        "configuration": {},
        "sandbox": sandbox,
    }
    (package / "descriptor.json").write_text(json.dumps(template))
    publish(package, domains.root / domain, domains.key(domain), domain, version="1.0.0")


async def ask_limits(runtime, domain: str) -> dict[str, list[int]]:
    question = Message(type="read", from_="hyperty://a.test/me", to=f"hyperty://{domain}/anyone")
    answer = await runtime.bus.request(question, timeout=15)
    assert response_code(answer) == 200, answer.body
    return answer.body["value"]


async def test_a_descriptors_memory_limit_is_the_stubs_address_space_limit(domains, runtime_factory) -> None:
    publish_rlimits_stub(domains, "b.test", {"memoryMB": 128})
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", memory_mb=512) as runtime:
        limits = await ask_limits(runtime, "b.test")
        assert limits["RLIMIT_AS"] == [128 * MIB, 128 * MIB]
        assert runtime.registry.stub("b.test").isolation["rlimits"]["memory_mb"] == 128


async def test_a_descriptor_cannot_raise_a_limit_above_the_runtimes(domains, runtime_factory) -> None:
    publish_rlimits_stub(domains, "b.test", {"memoryMB": 4096, "openFiles": 32})
    await domains.serve("b.test")
    async with runtime_factory(sandbox="process", memory_mb=512, open_files=64) as runtime:
        limits = await ask_limits(runtime, "b.test")
        assert limits["RLIMIT_AS"] == [512 * MIB, 512 * MIB]
        assert limits["RLIMIT_NOFILE"] == [32, 32]
