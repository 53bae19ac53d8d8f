"""A stub's declared Python requirements are checked before it runs: a missing one is a clear, permanent error."""

from __future__ import annotations

from importlib import metadata

import pytest

from protofly.runtime import StubDeploymentError
from protofly.supervision import Phase


@pytest.mark.parametrize(
    ("requirements", "problem"),
    [
        (["protofly-no-such-package>=1"], "protofly-no-such-package is not installed in the sandbox environment"),
        (["msgspec>=999"], f"msgspec {metadata.version('msgspec')} is installed; the stub needs msgspec>=999"),
    ],
)
async def test_a_missing_requirement_is_refused_with_its_name(domains, runtime_factory, requirements, problem) -> None:
    domains.publish("b.test", {}, stub="picky", fields={"requirements": requirements})
    await domains.serve("b.test")
    async with runtime_factory() as runtime:
        with pytest.raises(StubDeploymentError) as refused:
            await runtime.load_stub("b.test")
        assert refused.value.code == 424 and refused.value.cause == "requirements"
        assert problem in refused.value.description
        assert runtime.phase("b.test") is Phase.FAILED_PERMANENT  # no retry until an operator installs it
        assert runtime.registry.stub("b.test").info.get("pid") is None  # nothing ran


async def test_requirements_the_environment_meets_deploy(domains, runtime_factory, tmp_path) -> None:
    domains.publish("b.test", {}, stub="picky", fields={"requirements": ["msgspec>=0.18", "websockets"]})
    await domains.serve("b.test")
    credentials = tmp_path / "credentials.json"
    credentials.write_text('{"b.test": {"password": "right"}}')
    async with runtime_factory(credentials_file=credentials) as runtime:
        handle = await runtime.load_stub("b.test")
        assert handle.status == "live"
