"""The interworking stubs declare the clients they import; a sandbox environment without them refuses to run them."""

from __future__ import annotations

import json

import pytest
from tests.integration.protocols.clients import STUBS

from protofly.runtime import StubDeploymentError
from protofly.supervision import Phase


@pytest.mark.parametrize(("stub", "package"), [("xmpp", "slixmpp"), ("mqtt", "aiomqtt")])
def test_each_stub_declares_its_client_and_its_server(stub, package) -> None:
    descriptor = json.loads((STUBS / stub / "descriptor.json").read_text())
    assert any(r.startswith(package) for r in descriptor["requirements"])
    assert descriptor["egress"] == [descriptor["configuration"]["server"]]
    assert descriptor["interworking"] is True


@pytest.mark.parametrize(
    ("stub", "domain", "package"), [("xmpp", "chat.test", "slixmpp"), ("mqtt", "iot.test", "aiomqtt")]
)
async def test_a_missing_client_library_is_refused_with_its_name(
    catalogues, runtime_factory, stub, domain, package
) -> None:
    # a version no environment has: as if the extra that installs the client were missing
    await catalogues.publish(domain, stub, {"server": "tcp://127.0.0.1:9"}, requirements=[f"{package}>=999"])
    async with runtime_factory() as runtime:
        with pytest.raises(StubDeploymentError) as refused:
            await runtime.load_stub(domain)
        assert refused.value.code == 424 and refused.value.cause == "requirements"
        assert f"the stub needs {package}>=999" in refused.value.description
        assert runtime.phase(domain) is Phase.FAILED_PERMANENT
