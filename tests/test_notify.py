"""Notifications (orchestrator/notify.py) against a real HTTP server on 127.0.0.1 and a real shell command:
the Slack-compatible message for each event, once each, and a webhook URL that never shows anywhere."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.errors import UsageError
from orchestrator.notify import Notifier, message

SECRET_PATH = "/services/T000/B000/s3cr3t-t0ken"


@pytest.fixture
def hook():
    """A webhook server: records each POST's JSON; answers `status[0]`."""
    got: list[dict] = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append({"path": self.path, "type": self.headers["Content-Type"], **json.loads(body)})
            self.send_response(status[0])
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}{SECRET_PATH}", got, status
    server.shutdown()
    server.server_close()


def _notifier(notify: dict, said: list[str]) -> Notifier:
    return Notifier(parse_config({"notify": notify}, "grpoctl.yaml").notify, said.append)


def test_success_failure_and_preemption_reach_the_webhook_once_each(hook):
    url, got, _ = hook
    said: list[str] = []
    n = _notifier({"webhook": url}, said)
    assert n.send("succeeded", "run-a", "step 4/4, 0.01 chip-hours")
    assert n.send("failed", "run-b", "w0 exit code 1")
    assert n.send("preempted", "run-c", "node PREEMPTED")
    assert not n.send("preempted", "run-c", "node PREEMPTED")  # the same event seen on a later poll
    assert n.send("preempted", "run-c", "again", key="attempt 2")  # a second preemption is news
    assert [g["event"] for g in got] == ["succeeded", "failed", "preempted", "preempted"]
    assert got[0]["text"].endswith("grpoctl: run-a succeeded: step 4/4, 0.01 chip-hours")
    assert got[0]["path"] == SECRET_PATH and got[0]["type"] == "application/json" and not said


def test_a_webhook_that_fails_is_reported_without_its_url_and_never_raises(hook, tmp_path: Path):
    url, got, status = hook
    status[0] = 500
    said: list[str] = []
    n = _notifier({"webhook": url}, said)
    assert not n.send("failed", "run-x")
    assert len(got) == 1 and said == ["notify: the webhook did not take the failed message: HTTP 500"]
    gone = _notifier({"webhook": "http://127.0.0.1:9/" + SECRET_PATH}, said)  # nothing listens on 9
    assert not gone.send("recovered", "run-y")
    assert "unreachable" in said[-1]
    cfg = parse_config({"notify": {"webhook": url}}, "grpoctl.yaml")
    for text in (*said, repr(cfg), str(cfg.notify)):
        assert "s3cr3t" not in text and "127.0.0.1" not in text


def test_the_webhook_url_can_come_from_the_environment_and_bad_ones_are_refused(hook, monkeypatch):
    url, got, _ = hook
    monkeypatch.setenv("GRPOCTL_TEST_HOOK", url)
    assert _notifier({"webhook_env": "GRPOCTL_TEST_HOOK"}, []).send("node_deleted", "tpu-1", "idle 1800 s")
    assert got[-1]["event"] == "node_deleted" and "tpu-1 node deleted" in got[-1]["text"]
    monkeypatch.delenv("GRPOCTL_TEST_HOOK")
    with pytest.raises(UsageError, match=r"\$GRPOCTL_TEST_HOOK is not set"):
        _notifier({"webhook_env": "GRPOCTL_TEST_HOOK"}, []).send("failed", "r")
    with pytest.raises(UsageError, match="notify.webhook: must be an http") as err:
        parse_config({"notify": {"webhook": "ftp://h/s3cr3t"}}, "grpoctl.yaml")
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ValueError):
        message("exploded", "r")


def test_a_command_gets_the_message_on_stdin_and_in_its_environment(tmp_path: Path):
    out = tmp_path / "got"
    said: list[str] = []
    cmd = f'cat > {out}; echo "$GRPOCTL_EVENT $GRPOCTL_RUN_ID" >> {out}'
    assert _notifier({"command": cmd}, said).send("recovered", "run-r", "preemption #1")
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["text"].endswith("run-r recovered: preemption #1")
    assert lines[1] == "recovered run-r" and not said
    assert not _notifier({"command": "exit 7"}, said).send("failed", "run-f")
    assert said == ["notify: the command exited 7 for the failed message"]
    assert not Notifier(None).enabled and not Notifier(None).send("failed", "r")


def test_a_notification_that_cannot_be_sent_never_stops_the_wait(monkeypatch):
    """`run --recover` with notify.webhook_env unset: the preemption's message cannot go out, and the
    recovery (which acts after the monitor's callbacks) goes on; each message not sent is said."""
    from types import SimpleNamespace

    from orchestrator.lifecycle.monitor import Action, Decision
    from orchestrator.lifecycle.states import RunState
    from orchestrator.notify import RunNotices

    monkeypatch.delenv("GRPOCTL_TEST_HOOK", raising=False)
    said: list[str] = []
    record = SimpleNamespace(run_id="r", recoveries=[], state=RunState.SUCCEEDED, last_progress={},
                             target="t")
    notices = RunNotices(_notifier({"webhook_env": "GRPOCTL_TEST_HOOK"}, said), record)
    notices.on_decision(record, Decision(Action.RECOVER, RunState.PREEMPTED, "node PREEMPTED"))
    notices.finished(record, None)
    assert said == [
        f"notify: the {event} message was not sent: notify.webhook_env: $GRPOCTL_TEST_HOOK is not set"
        for event in ("preempted", "succeeded")
    ]
