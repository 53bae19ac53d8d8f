"""The deploy stream's lines: typed runtime events in on the server, text out in the CLI."""

from __future__ import annotations

from rich.console import Console

from protofly.admin.views import DeployView, event_line, failed_result, progress_text
from protofly.events import DeployStep, RestartScheduled, StatusChanged, StubLive

URL = "hyperty-runtime://a.test/rt/protostub/1"


def test_a_status_line_keeps_the_registry_timestamp_and_the_others_are_stamped_now() -> None:
    status = event_line(StatusChanged("b.test", URL, "live", None, at=100.0), now=200.0)
    step = event_line(DeployStep("b.test", URL, "sandbox", "5, 7, 9", 12.5), now=200.0)
    assert status == {"event": "status", "domain": "b.test", "stub_url": URL, "value": "live",
                      "description": None, "at": 100.0}  # fmt: skip
    assert step["event"] == "step" and step["at"] == 200.0 and step["ms"] == 12.5


def test_progress_text_for_each_kind_of_line() -> None:
    assert progress_text({"event": "status", "value": "live", "description": "up"}) == "  status    live: up"
    assert progress_text(event_line(DeployStep("b.test", URL, "connect", "10", 3.25, "ok"), 0.0)) == (
        "  ✓ connect         3.2 ms  ok"  # name in 10 columns, milliseconds in 9
    )
    assert progress_text(event_line(StubLive("b.test", URL, 10.0, 42), 0.0)) is None
    assert progress_text({"event": "deployment-failed", "code": 503}) is None
    restart = event_line(RestartScheduled("b.test", URL, 0.5), 7.0)
    assert progress_text(restart) == "  ! restart-scheduled  delay_s=0.5"


def test_deploy_view_fails_without_a_result_and_reports_a_failed_one(capsys) -> None:
    view = DeployView(Console(width=200, force_terminal=False), "b.test")
    assert view.finish() is False
    assert "error: the runtime ended the stream without an outcome for b.test" in capsys.readouterr().err

    view = DeployView(Console(width=200, force_terminal=False), "c.test")
    view.show(failed_result("c.test", 503, "E_UNTRUSTED: signed by key ...", cause="E_UNTRUSTED"))
    assert view.finish() is False
    assert "error: deployment of c.test failed (503): E_UNTRUSTED: signed by key ..." in capsys.readouterr().err
