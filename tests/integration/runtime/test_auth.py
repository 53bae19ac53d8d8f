"""Credentials a server refuses: a distinct status, no retry loop against the "no", and a way back."""

from __future__ import annotations

import json

from protofly.events import DeployStep
from protofly.message import Message, response_code
from protofly.runtime import StubDeploymentError
from protofly.supervision import Phase


async def test_refused_credentials_stop_retries_until_new_ones_are_set(domains, runtime_factory, tmp_path) -> None:
    domains.publish("b.test", {}, stub="picky")
    await domains.serve("b.test")
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"b.test": {"password": "wrong"}}))
    async with runtime_factory(credentials_file=credentials) as runtime:
        connects: list[DeployStep] = []
        runtime.events.subscribe(
            lambda e: connects.append(e) if isinstance(e, DeployStep) and e.step == "sandbox" else None
        )
        try:
            await runtime.load_stub("b.test")
        except StubDeploymentError as exc:
            failure = exc
        else:
            raise AssertionError("a stub whose server refused the credentials went live")
        assert failure.code == 401 and failure.cause == "auth" and "refused" in failure.description
        assert runtime.phase("b.test") is Phase.AUTH_FAILED
        record = runtime.registry.stub("b.test")
        assert record.summary()["cause"] == "auth" and record.status == "deployment-failed"

        # messages get the refusal at once, and none of them starts another attempt against the server
        for _ in range(5):
            answer = await runtime.bus.request(
                Message(type="read", from_="hyperty://a.test/me", to="hyperty://b.test/x")
            )
            assert response_code(answer) == 401, answer.body
        assert len(connects) == 1

        runtime.set_credentials("b.test", {"password": "right"})
        handle = await runtime.retry_now("b.test")
        assert handle.status == "live" and runtime.phase("b.test") is Phase.LIVE
        assert record.summary()["cause"] is None
        answer = await runtime.bus.request(Message(type="read", from_="hyperty://a.test/me", to="hyperty://b.test/x"))
        assert response_code(answer) == 200
