"""A node that deletes itself (grpoctl_contract/watchdog.py, orchestrator/cloud/autodelete.py): on the
fake API, an idle node grpoctl created deletes itself with its service-account token from the metadata
server; a node grpoctl only attached to never gets a watchdog; a live grpoctl job counts as activity."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_notify import SECRET_PATH, hook  # noqa: F401 - the webhook server fixture
from tpu_support import Project

from grpoctl_contract import watchdog
from orchestrator.cloud import autodelete

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


@pytest.fixture()
def wired(project: Project) -> Project:
    """The watchdog asks the fake for its token and looks for jobs 5 times a second."""
    project.wiring = dataclasses.replace(
        project.wiring, metadata_base=project.fake.endpoint, autodelete_poll_s=0.2
    )
    return project


def _gone(project: Project, name: str, within_s: float = 60.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if project.node(name) is None:
            return True
        time.sleep(0.2)
    return False


def test_an_idle_node_deletes_itself_with_its_own_token(wired: Project, hook) -> None:  # noqa: F811
    url, got, _ = hook
    cfg = wired.config(name="grpo-idle", autodelete_after_idle_s=3)
    data = yaml.safe_load(Path(cfg).read_text())
    Path(cfg).write_text(yaml.safe_dump({**data, "notify": {"webhook": url}}))
    up = wired.cli(cfg, "up")
    assert "deletes itself after 3 s without a grpoctl job" in up.stderr
    home = wired.node("grpo-idle").workers[0].home
    status = wired.cli(cfg, "status").stdout
    assert "target tpu: READY" in status and "deletes itself at " in status, status
    assert _gone(wired, "grpo-idle"), "the idle node is still there"
    tokens = [r for r in wired.fake.requests if r.path.startswith("/computeMetadata/")]
    deletes = [r for r in wired.fake.requests if r.method == "DELETE" and r.path.endswith("/grpo-idle")]
    assert tokens and len(deletes) == 1
    assert deletes[0].authorization == f"Bearer {wired.fake.SA_TOKEN}"  # the VM's own credentials
    state = json.loads((home / ".grpoctl" / "watchdog.json").read_text())
    assert state["idle_after_s"] == 3 and state["node"] == "grpo-idle"
    stat = Path(f"/proc/{state['pid']}/stat")  # the VM went, and its watchdog with it (a zombie at most)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert wired.fake.SA_TOKEN not in (home / ".grpoctl" / "watchdog.log").read_text()
    # one node_deleted message, sent by the node itself; its copy of the URL was 0600, never in argv
    assert [g["event"] for g in got] == ["node_deleted"] and "grpo-idle node deleted" in got[0]["text"]
    assert (home / ".grpoctl" / "notify.json").stat().st_mode & 0o777 == 0o600
    assert SECRET_PATH not in up.stdout + up.stderr + status


def test_a_node_grpoctl_did_not_create_never_deletes_itself(wired: Project) -> None:
    before = len(wired.fake.requests)  # the fake serves the whole module
    body = {"acceleratorType": "v6e-8", "runtimeVersion": "v2-alpha-tpuv6e", "labels": {"team": "theirs"}}
    url = f"{wired.fake.endpoint}/v2/projects/proj/locations/us-east1-d/nodes?nodeId=grpo-theirs"
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
    node_url = f"{wired.fake.endpoint}/v2/projects/proj/locations/us-east1-d/nodes/grpo-theirs"
    deadline = time.monotonic() + 30
    # time passes in the fake as it serves requests: ask for the node like a client does (reading the
    # fake's memory alone never advanced it, and this loop used to run out its 30 s)
    while json.loads(urllib.request.urlopen(node_url).read())["state"] != "READY":
        assert time.monotonic() < deadline, "the node never became READY"
        time.sleep(0.05)
    # spot=False: the node is on-demand (another spot-ness is refused: issue 20)
    up = wired.cli(wired.config(name="grpo-theirs", spot=False, autodelete_after_idle_s=1), "up")
    assert "deletes itself" not in up.stderr
    assert not (wired.node("grpo-theirs").workers[0].home / ".grpoctl" / "watchdog.py").exists()
    assert not [r for r in wired.fake.requests[before:] if r.path.startswith("/computeMetadata/")]
    wired.cli(wired.config(name="grpo-theirs"), "down", "--yes")


def test_a_live_grpoctl_job_in_the_checkout_counts_as_activity(tmp_path: Path) -> None:
    checkout = tmp_path / "grpoctl-work"
    (checkout / "logs").mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    job = subprocess.Popen(sleeper, cwd=checkout, env={**os.environ, "GRPOCTL_RUN_ID": "r1"})
    other = subprocess.Popen(sleeper, cwd=tmp_path, env={**os.environ, "GRPOCTL_RUN_ID": "r2"})
    try:
        assert watchdog.job_running(str(checkout))
        assert not watchdog.job_running(str(tmp_path / "elsewhere"))  # another checkout's job is not ours
    finally:
        job.kill()
        job.wait()
    assert not watchdog.job_running(str(checkout))
    other.kill()
    other.wait()
    assert watchdog.newest_log(str(checkout)) == 0.0
    (checkout / "logs" / "nohup_x.log").write_text("x")
    assert watchdog.newest_log(str(checkout)) > 0
    assert autodelete.describe({"deletes_at": 0.0, "idle_after_s": 1800}, now=0.0).startswith(
        "deletes itself at 00:00 UTC (in 0 min)"
    )
    assert autodelete.describe(None) is None and autodelete.describe({"deleted_at": 1}) is None


def test_a_delete_that_fails_is_retried_and_the_message_goes_out_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    tries: list[int] = []

    def delete(*_args: object, **_kwargs: object) -> None:
        tries.append(1)
        if len(tries) < 3:
            raise OSError("an API blip")

    monkeypatch.setattr(watchdog, "notify", lambda _file, node, _idle: sent.append(node))
    monkeypatch.setattr(watchdog, "delete_self", delete)
    (tmp_path / "checkout").mkdir()
    args = ["--idle-s", "0", "--poll-s", "0.01", "--checkout", str(tmp_path / "checkout"), "--project", "p",
            "--zone", "z", "--node", "grpo-x", "--state", str(tmp_path / "state.json"),
            "--notify-file", str(tmp_path / "notify.json")]
    assert watchdog.main(args) == 0
    assert len(tries) == 3 and sent == ["grpo-x"]  # one node_deleted message, not one per try
    assert "deleted_at" in json.loads((tmp_path / "state.json").read_text())
