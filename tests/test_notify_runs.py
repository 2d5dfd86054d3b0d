"""Notifications from real waits on the fake TPU API (grpoctl.yaml `notify.webhook` pointing at an HTTP
server on 127.0.0.1): a run that succeeds, one that fails, and one preempted and recovered; the recovered
run's ledger counts the steps it redid and the recovery."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from standin import git
from test_notify import SECRET_PATH, hook  # noqa: F401 - the webhook server fixture
from tpu_support import Project, long_run, preempt_at_step

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def _with_notify(config: str, url: str) -> str:
    data = yaml.safe_load(Path(config).read_text())
    data["notify"] = {"webhook": url}
    Path(config).write_text(yaml.safe_dump(data))
    return config


def test_success_failure_and_a_recovered_preemption_each_send_their_message(
    project: Project, hook  # noqa: F811
) -> None:
    url, got, _ = hook
    long_run(project)  # checkpoints in a bucket that outlives the VM
    config = project.repo.work / "configs" / "standin.yaml"  # 150 steps: the preemption lands mid-run
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps": 150}) + "\n")
    git(project.repo.work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qam", "150 steps")
    git(project.repo.work, "push", "-q", "origin", "main")
    cfg = _with_notify(project.config(name="grpo-notify", autodelete_after_idle_s=0), url)
    project.cli(cfg, "up")
    project.cli(cfg, "sync")
    preempt_at_step(project, project.root / "bucket", "grpo-notify", 5)
    rec = project.cli(cfg, "--json", "run", "configs/standin.yaml", "--recover", "--interval", "0.1")
    status = json.loads(rec.stdout)
    assert [g["event"] for g in got] == ["preempted", "recovered", "succeeded"]
    assert all(g["subject"] == status["run_id"] for g in got) and "node PREEMPTED" in got[0]["text"]
    assert "chip-hours" in got[2]["text"] and "goodput" in got[2]["text"]
    # the recovered run's ledger: the steps after the last checkpoint were done twice, and the recreate
    seconds = status["ledger"]["seconds"]
    assert seconds["recovery"] > 0 and seconds["lost_progress"] >= 0 and seconds["train"] > 0, seconds

    bad = project.cli(cfg, "run", "configs/fail3.yaml", "--wait", "--interval", "0.1", code=1)
    assert [g["event"] for g in got[3:]] == ["failed"] and "exit code 3" in got[3]["text"]
    for text in (rec.stdout + rec.stderr, bad.stdout + bad.stderr):
        assert SECRET_PATH not in text  # the webhook URL is a secret
    project.cli(cfg, "down", "--yes")
