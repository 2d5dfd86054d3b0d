"""Issue 10 (part B): waiting asks the Cloud TPU API when workers stop answering, and a silent job shows
STALLED. The fake TPU API with loopback sshd workers, the resumable stand-in, and the local target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from standin import make_standin_repo
from tpu_support import Project, long_run, one_line_error, outcome, preempt_at_step
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import PreemptedError
from orchestrator.lifecycle import recovery as lifecycle
from orchestrator.ops.session import open_session

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def test_preempted_node_is_reported_on_the_next_poll_and_recoverable_later(project: Project) -> None:
    """~18 s: up, sync, a 60-step run preempted at step 2, status without a node, `recover`."""
    repo = make_standin_repo(
        project.root / "long", steps=60, step_s=0.05, checkpoint_dir=str(project.root / "bucket")
    )
    os.chdir(repo.work)
    (repo.work / ".env").write_text("WANDB_API_KEY=x\n")
    project.repo = repo  # what the workers clone
    cfg = project.config(name="grpo-gone")
    for args in (["up"], ["sync"], ["env", "push"]):
        project.cli(cfg, *args)
    token = "tok-never-stored-4d3c2b1a"  # a --secret value: a relaunch needs it, the store never has it
    os.environ["TEST_TOKEN"] = token  # --secret NAME takes the value from the environment, never argv
    try:
        run_id = project.cli(cfg, "run", repo.config, "--secret", "TEST_TOKEN").stdout.strip()
    finally:
        del os.environ["TEST_TOKEN"]

    session = open_session(config_file=cfg, tpu_wiring=project.wiring)
    record = session.store.get(run_id)
    polls: list[str] = []
    preempted_at: list[int] = []

    def on_poll(rec, poll) -> None:  # type: ignore[no-untyped-def]
        polls.append(rec.state)
        if not preempted_at and poll.progress is not None and poll.progress.step >= 2:
            project.fake.preempt("grpo-gone")  # the spot VM is taken back right after this poll
            preempted_at.append(len(polls))

    try:
        # unreachable_timeout only bounds how long an SSH-only wait would retry (15 min by default).
        with pytest.raises(PreemptedError) as err:
            lifecycle.wait(session, record, None, interval=0.1, on_poll=on_poll, unreachable_timeout=60)
    finally:
        session.close()
    assert preempted_at, (polls, record.state, record.last_progress)
    assert len(polls) - preempted_at[0] <= 2, polls  # reported within two poll intervals
    assert (
        err.value.exit_code == 3
        and "node PREEMPTED" in str(err.value)
        and f"recover {run_id}" in str(err.value)
    )
    stored = json.loads(project.cli(cfg, "status", run_id, "--json").stdout)
    assert stored["state"] == "PREEMPTED" and {w["state"] for w in stored["workers"]} == {"PREEMPTED"}

    listing = project.cli(cfg, "status")  # the node is PREEMPTED: the run is listed, exit 0
    assert run_id in listing.stdout and "PREEMPTED" in listing.stdout
    assert "target tpu: PREEMPTED" in listing.stdout
    watched = project.cli(cfg, "status", run_id, "--watch", code=3)
    assert "PREEMPTED" in one_line_error(watched) and "Traceback" not in watched.output

    refused = project.cli(cfg, "recover", run_id, "--interval", "0.2", code=2)  # secrets not given again
    assert "TEST_TOKEN" in one_line_error(refused) and "pass them again" in refused.stderr
    os.environ["TEST_TOKEN"] = token
    try:
        recovered = project.cli(cfg, "recover", run_id, "--interval", "0.2", "--secret", "TEST_TOKEN")
    finally:
        del os.environ["TEST_TOKEN"]
    assert outcome(recovered.stdout) == (run_id, "SUCCEEDED")
    final = json.loads(project.cli(cfg, "status", run_id, "--json").stdout)
    assert len(final["recoveries"]) == 1 and final["recoveries"][0]["kind"] == "preemption"
    assert final["last_progress"]["step"] == 60
    assert final["env_names"] == ["TEST_TOKEN"] and token not in json.dumps(final)

    project.cli(cfg, "down", "--yes")  # the node is gone altogether: status still lists every record
    gone = project.cli(cfg, "status")
    assert run_id in gone.stdout and "target tpu: NOT_FOUND" in gone.stdout


def test_run_wait_exits_3_with_one_line_when_the_node_is_preempted(project: Project) -> None:
    """~15 s: the real entry point (a subprocess) waits; the VM is taken back at step 3."""
    repo = make_standin_repo(
        project.root / "wait", steps=60, step_s=0.05, checkpoint_dir=str(project.root / "bucket")
    )
    os.chdir(repo.work)
    (repo.work / ".env").write_text("WANDB_API_KEY=x\n")
    project.repo = repo
    cfg = project.config(name="grpo-wait")
    for args in (["up"], ["sync"], ["env", "push"]):
        project.cli(cfg, *args)
    preempt_at_step(project, project.root / "bucket", "grpo-wait", 3)
    args = ["--config-file", cfg, "run", repo.config, "--wait", "--interval", "0.1"]
    # The timeout only stops a wait that would ride out SSH errors for 15 minutes (today's main).
    done = subprocess.run(
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", *args],  # grpoctl + the fake's ports
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("grpoctl: error:")]
    assert done.returncode == 3 and len(errors) == 1, done.stderr
    assert "node PREEMPTED" in errors[0] and "Traceback" not in done.stderr
    run_id, state = outcome(done.stdout)
    assert state == "PREEMPTED" and f"grpoctl recover {run_id}" in errors[0]


SOP = """
name: spot_no_recover
target: tpu
steps:
  - up
  - sync
  - env_push
  - run: {name: long, config: configs/standin.yaml, interval_s: 0.1}
  - fetch
"""


def test_sop_wait_stops_at_a_preemption_and_replay_recover_resumes_the_same_run(project: Project) -> None:
    """~17 s: an SOP without --recover fails its run step (exit 3, PREEMPTED in the report); a second
    replay with --recover re-attaches to that run id, relaunches it and finishes the SOP."""
    long_run(project)  # 40 steps, checkpoints in the "bucket"
    cfg = project.config(name="grpo-sop-b")
    Path("spot.yaml").write_text(SOP)
    preempted_at = preempt_at_step(project, project.root / "bucket", "grpo-sop-b", 3)
    args = ["--config-file", cfg, "sop", "replay", "spot.yaml", "--report", "report.md"]
    done = subprocess.run(  # timeout: see test_run_wait_exits_3_with_one_line_when_the_node_is_preempted
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", *args],  # grpoctl + the fake's ports
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 3 and preempted_at, done.stderr
    assert "node PREEMPTED" in done.stderr.strip().splitlines()[-1]
    state = json.loads(Path("report.state.json").read_text())
    run_id = state["steps"]["run:long"]["run_id"]
    assert state["steps"]["run:long"]["status"] == "failed"
    assert state["steps"]["run:long"]["record"]["state"] == "PREEMPTED"

    resumed = project.cli(cfg, "sop", "replay", "spot.yaml", "--report", "report.md", "--recover")
    assert f"re-attached to {run_id} (PREEMPTED)" in resumed.stderr
    state = json.loads(Path("report.state.json").read_text())
    assert state["steps"]["run:long"]["run_id"] == run_id and state["steps"]["fetch"]["status"] == "done"
    assert "**SUCCEEDED**" in Path("report.md").read_text()
    assert json.loads((Path("runs") / run_id / "summary.json").read_text())["resumed_from"] >= 3
    project.cli(cfg, "down", "--yes")


def test_status_marks_a_running_record_preempted_then_down_stops_it(project: Project) -> None:
    """~6 s: a RUNNING record whose node was preempted: `status` exit 0, PREEMPTED; a second run still in
    flight when `down` deletes the node is recorded STOPPED (with why), its workers too."""
    cfg = project.config(name="grpo-deleted")
    for args in (["up"], ["sync"], ["env", "push"]):
        project.cli(cfg, *args)
    run_id = project.cli(cfg, "run", project.repo.config, "--set", "steps=400").stdout.strip()
    project.fake.preempt("grpo-deleted")
    listing = project.cli(cfg, "status")
    assert run_id in listing.stdout and "PREEMPTED" in listing.stdout
    assert json.loads(project.cli(cfg, "status", run_id, "--json").stdout)["state"] == "PREEMPTED"
    project.cli(cfg, "up")
    project.cli(cfg, "sync")
    second = project.cli(cfg, "run", project.repo.config, "--set", "steps=400").stdout.strip()
    down = project.cli(cfg, "down", "--yes")
    assert f"{second}: STOPPED" in down.stderr and run_id not in down.stderr  # only runs in flight
    record = json.loads(project.cli(cfg, "status", second, "--json").stdout)
    assert record["state"] == "STOPPED" and {w["state"] for w in record["workers"]} == {"STOPPED"}
    assert "grpoctl down" in record["state_reason"]


# ------------------------------------------------------------------------------------------- STALLED


def test_sigstopped_trainer_shows_stalled_then_running_again(
    standin_repo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """~5 s on the local target: SIGSTOP the job, `status --stall-after 1` says STALLED; SIGCONT clears it."""

    url, _ = standin_repo
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True)
    monkeypatch.chdir(work)
    (tmp_path / "grpoctl.yaml").write_text(
        f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n"
    )
    runner = CliRunner()

    def cli(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, ["--config-file", str(tmp_path / "grpoctl.yaml"), *args])
        assert result.exit_code == code, (args, result.output, result.exception)
        return result

    cli("sync")
    run_id = cli("run", "configs/slow.yaml").stdout.strip()
    try:
        record = _status(cli, run_id)
        pid = record["workers"][0]["pid"]
        os.killpg(pid, signal.SIGSTOP)  # our own job's process group (setsid): nothing else
        try:
            record = _until(cli, run_id, lambda r: r["state"] == "STALLED")
            assert record["workers"][0]["state"] == "STALLED" and record["workers"][0]["quiet_s"] >= 1
            table = cli("status", "--stall-after", "1").stdout
            assert "STALLED" in table and "no output for" in table
            assert _status(cli, run_id, stall_after="3600")["state"] == "RUNNING"  # the limit is the user's
        finally:
            os.killpg(pid, signal.SIGCONT)
        assert _until(cli, run_id, lambda r: r["state"] == "RUNNING")["workers"][0]["state"] == "RUNNING"
    finally:
        cli("stop", run_id)


def _status(cli, run_id: str, stall_after: str = "1") -> dict:  # type: ignore[no-untyped-def]
    return json.loads(cli("status", run_id, "--json", "--stall-after", stall_after).stdout)


def _until(cli, run_id: str, done) -> dict:  # type: ignore[no-untyped-def]
    for _ in range(200):  # a bound on polls, not a timing assertion
        record = _status(cli, run_id)
        if done(record):
            return record
        time.sleep(0.1)
    raise AssertionError(f"never reached: {record}")


def test_stall_after_s_is_a_config_setting(tmp_path: Path) -> None:
    from orchestrator.config import parse_config

    assert parse_config({"stall_after_s": 120}, "t").stall_after_s == 120
    assert parse_config({}, "t").stall_after_s == 1800
