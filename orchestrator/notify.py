"""Notifications: one message when a run succeeds, fails, is preempted or recovered, or a node deletes
itself (grpoctl.yaml `notify:`).

Two ways out, either or both: a webhook (Slack-compatible JSON, `{"text": ...}`, POSTed) and a command
(run by the shell, the message on stdin as the same JSON, and in GRPOCTL_EVENT / GRPOCTL_RUN_ID /
GRPOCTL_MESSAGE). The webhook URL is a secret (Slack's carries its token in the path): it is never
printed, logged or put in an error; a failed delivery says what failed, not where. A notification that
cannot be delivered never fails the command that sent it.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.config import NotifyConfig
from orchestrator.errors import JobFailed, PreemptedError, UsageError
from orchestrator.lifecycle.states import RunState

if TYPE_CHECKING:  # the lifecycle imports the targets, and a TPU target's watchdog imports this module
    from orchestrator.lifecycle.monitor import Decision
    from orchestrator.runs import RunRecord

EVENTS = ("succeeded", "failed", "preempted", "recovered", "node_deleted")
_ICONS = {"succeeded": "✅", "failed": "❌", "preempted": "⚠️", "recovered": "🔁", "node_deleted": "🗑️"}


def message(event: str, subject: str, detail: str = "") -> dict[str, Any]:
    """The Slack-compatible payload: `{"text": ..., "event": ..., "subject": ...}` (Slack reads `text`)."""
    if event not in EVENTS:
        raise ValueError(f"unknown notification event {event!r}")
    text = f"{_ICONS[event]} grpoctl: {subject} {event.replace('_', ' ')}" + (f": {detail}" if detail else "")
    return {"text": text, "event": event, "subject": subject}


class Notifier:
    """Sends each (subject, event, key) once: a monitor that sees the same end on two polls, or a replay
    that re-attaches to a finished run, does not notify twice."""

    def __init__(self, cfg: NotifyConfig | None, say: Callable[[str], None] = lambda _: None) -> None:
        self.cfg, self.say = cfg, say
        self._sent: set[tuple[str, str, str]] = set()

    @property
    def enabled(self) -> bool:
        return self.cfg is not None and (self.webhook_url() is not None or bool(self.cfg.command))

    def webhook_url(self) -> str | None:
        cfg = self.cfg
        if cfg is None:
            return None
        if cfg.webhook is not None:
            return cfg.webhook.get_secret_value()
        if cfg.webhook_env:
            value = os.environ.get(cfg.webhook_env)
            if not value:
                raise UsageError(f"notify.webhook_env: ${cfg.webhook_env} is not set")
            return value
        return None

    def send(self, event: str, subject: str, detail: str = "", *, key: str = "") -> bool:
        """Deliver one message; True when every configured way took it. Never raises for a delivery."""
        if not self.enabled or (subject, event, key) in self._sent:
            return False
        self._sent.add((subject, event, key))
        payload = message(event, subject, detail)
        ok = True
        url = self.webhook_url()
        if url is not None:
            ok &= self._post(url, payload)
        if self.cfg is not None and self.cfg.command:
            ok &= self._run(self.cfg.command, payload)
        return ok

    def _post(self, url: str, payload: dict[str, Any]) -> bool:
        assert self.cfg is not None
        body = json.dumps(payload).encode()
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                response.read()
            return True
        except urllib.error.HTTPError as err:  # the URL stays out of every line below
            why = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            why = f"unreachable ({type(reason).__name__})"
        self.say(f"notify: the webhook did not take the {payload['event']} message: {why}")
        return False

    def _run(self, command: str, payload: dict[str, Any]) -> bool:
        assert self.cfg is not None
        env = {**os.environ, "GRPOCTL_EVENT": payload["event"], "GRPOCTL_RUN_ID": payload["subject"],
               "GRPOCTL_MESSAGE": payload["text"]}
        try:
            done = subprocess.run(command, shell=True, input=json.dumps(payload) + "\n", text=True, env=env,
                                  capture_output=True, timeout=self.cfg.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            took = f"{self.cfg.timeout_s:g} s"
            self.say(f"notify: the command took over {took} for the {payload['event']} message")
            return False
        if done.returncode != 0:
            self.say(f"notify: the command exited {done.returncode} for the {payload['event']} message")
            return False
        return True


class RunNotices:
    """The messages of one waited run, from its lifecycle monitor's decisions (orchestrator/lifecycle):
    preempted when the monitor decides to recover (or gives the run up as PREEMPTED), recovered when a new
    entry shows in the record's `recoveries`, and how the wait ended. A message that cannot be sent (its
    `webhook_env` unset) is said, never raised: the wait, and a recovery it is about to make, go on."""

    def __init__(
        self, notifier: Notifier, record: RunRecord, ledger_line: Callable[[RunRecord], str] | None = None
    ) -> None:
        self.notifier, self.ledger_line = notifier, ledger_line
        self.seen = len(record.recoveries)

    def on_decision(self, record: RunRecord, decision: Decision) -> None:
        from orchestrator.lifecycle.monitor import Action

        if decision.action is Action.RECOVER:
            n = len(record.recoveries) + 1  # the recovery this decision starts
            self._send("preempted", record.run_id, decision.reason, key=f"#{n}")
        self._recovered(record)

    def _recovered(self, record: RunRecord) -> None:
        for i, entry in enumerate(record.recoveries[self.seen :], start=self.seen + 1):
            what = f"relaunched ({entry.get('kind')} #{i}) at step {entry.get('step')}"
            self._send("recovered", record.run_id, f"{what}, resumes from a checkpoint", key=f"#{i}")
        self.seen = len(record.recoveries)

    def finished(self, record: RunRecord, err: BaseException | None) -> None:
        """After the wait: succeeded, failed, or preempted (not recovered); nothing for a ^C or the like."""
        self._recovered(record)
        if err is None and record.state is RunState.SUCCEEDED:
            ev = record.last_progress
            steps = f"step {ev.step}/{ev.total}" if ev and ev.total else "done"
            extra = f"; {self.ledger_line(record)}" if self.ledger_line is not None else ""
            self._send("succeeded", record.run_id, f"{steps} on {record.target}{extra}")
        elif isinstance(err, PreemptedError):  # the same key as the decision's: one message
            self._send("preempted", record.run_id, str(err), key=f"#{len(record.recoveries) + 1}")
        elif isinstance(err, JobFailed):
            self._send("failed", record.run_id, str(err))

    def _send(self, event: str, subject: str, detail: str, *, key: str = "") -> None:
        try:
            self.notifier.send(event, subject, detail, key=key)
        except UsageError as err:  # the config's to fix (its message never holds the URL)
            self.notifier.say(f"notify: the {event} message was not sent: {err}")
