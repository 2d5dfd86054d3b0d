"""Issue 20: one run lifecycle, right in every state the Cloud TPU API can put a node in. The fake TPU API
with loopback sshd workers, the stand-in trainer that checkpoints to a "bucket" outside the VMs, and the
real CLI (in-process, or a subprocess where the laptop itself must die or be waited on with a bound)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tpu_support import Project, long_run, one_line_error, outcome, soak

from orchestrator.cloud import api as cloud
from orchestrator.lifecycle import recovery as lifecycle
from orchestrator.ops.session import open_session
from orchestrator.runs import RunStore

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def ready(project: Project, name: str, steps: int = 40, **tpu: object) -> str:
    """A 40-step stand-in (checkpoints in the bucket), a node `name` up, synced, .env pushed."""
    long_run(project)
    if steps != 40:
        cfg_file = project.repo.work / "configs" / "standin.yaml"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "steps": steps}) + "\n")
        from standin import git

        git(project.repo.work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qam", "steps")
        git(project.repo.work, "push", "-q", "origin", "main")
    cfg = project.config(name=name, **tpu)
    for args in (["up"], ["sync"], ["env", "push"]):
        project.cli(cfg, *args)
    return cfg


def at_step(project: Project, step: int, action: Callable[[], None]) -> list[int]:
    """In the background: once the run has checkpointed `step` (in the bucket), do `action` once."""
    done: list[int] = []
    bucket = project.root / "bucket"

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = list(bucket.glob("*/step"))
            if found and int(found[0].read_text() or 0) >= step:
                done.append(int(found[0].read_text()))
                action()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return done


def grpoctl(cfg: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The real entry point in a subprocess (bounded: a wait that would ride out errors for 15 min ends)."""
    return subprocess.run(
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", "--config-file", cfg, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def creates(project: Project, name: str) -> int:
    return len([r for r in project.fake.creates() if r.query["nodeId"] == [name]])


def starts(project: Project, run_id: str) -> list[int]:
    return [int(x) for x in (project.root / "bucket" / run_id / "starts").read_text().split()]


def stored(run_id: str) -> dict:
    return RunStore().get(run_id).to_json()


def errors_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("grpoctl: error:")]


# ------------------------------------------------------------------------------------ down and deletes


@pytest.mark.parametrize("who", ["grpoctl down", "someone else"])
def test_a_delete_during_a_recover_wait_stops_the_run_and_recreates_nothing(project: Project, who: str):
    name = "grpo-down" if who == "grpoctl down" else "grpo-deleted"
    cfg = ready(project, name, steps=400)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", "--config-file", cfg,
         "run", "configs/standin.yaml", "--recover", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started = list(project.root.glob("bucket/*/step"))
        for _ in range(600):  # the job has checkpointed a step: it runs
            started = list(project.root.glob("bucket/*/step"))
            if started and int(started[0].read_text() or 0) >= 3:
                break
            time.sleep(0.05)
        run_id = started[0].parent.name
        if who == "grpoctl down":
            refused = project.cli(cfg, "down", code=2)  # no terminal: it names the run and asks for --yes
            assert run_id in one_line_error(refused) and "--yes" in refused.stderr and project.node(name)
            down = project.cli(cfg, "down", "--yes")
            assert f"{run_id}: STOPPED" in down.stderr
        else:
            project.fake.delete_by_someone(name)
        out, err = waiter.communicate(timeout=120)
    finally:
        waiter.kill()
    assert waiter.returncode == 3 and len(errors_of(err)) == 1, err
    assert f"run {run_id} stopped" in errors_of(err)[0] and f"grpoctl recover {run_id}" in errors_of(err)[0]
    assert out.split()[-2:] == [run_id, "STOPPED"]
    time.sleep(0.5)  # a recreation would have been requested by now
    assert project.node(name) is None and creates(project, name) == 1  # the spend stopped
    record = stored(run_id)
    assert record["state"] == "STOPPED" and "deleted" in record["state_reason"]
    # asked for: `recover` resumes it from its checkpoint, same run id
    resumed = project.cli(cfg, "recover", run_id, "--interval", "0.1", "--max-preemptions", "3")
    assert outcome(resumed.stdout) == (run_id, "SUCCEEDED") and starts(project, run_id)[-1] >= 3
    project.cli(cfg, "down", "--yes")


# ------------------------------------------------------------------------------- a node that came back


@pytest.mark.parametrize("state", ["RESTARTING", "REIMAGING", "REPAIRING"])
def test_a_node_that_restarts_is_relaunched_on_from_the_checkpoint(project: Project, state: str) -> None:
    name = f"grpo-{state.lower()}"
    cfg = ready(project, name)
    hit = at_step(project, 5, lambda: project.fake.restart(name, state, down_s=0.5))
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.1")
    run_id, final = outcome(ran.stdout)
    assert final == "SUCCEEDED" and hit
    record = stored(run_id)
    assert [r["kind"] for r in record["recoveries"]] == ["restart"]
    assert starts(project, run_id)[1] >= hit[0]  # resumed from its checkpoint, not from 0
    assert creates(project, name) == 1  # the node came back by itself: nothing recreated
    project.cli(cfg, "down", "--yes")


def test_a_waiter_started_while_the_node_starts_reaches_it_once_ready(project: Project) -> None:
    cfg = ready(project, "grpo-starting")
    run_id = project.cli(cfg, "run", "configs/standin.yaml").stdout.strip()
    project.fake.report_state("grpo-starting", "STARTING")  # the API says STARTING, no endpoints; VMs live on
    session = open_session(config_file=cfg, tpu_wiring=project.wiring)
    try:
        record = session.store.get(run_id)
        threading.Timer(0.5, lambda: project.fake.report_state("grpo-starting", "READY")).start()
        done = lifecycle.wait(session, record, None, interval=0.1, unreachable_timeout=20)
    finally:
        session.close()
    assert done.state == "SUCCEEDED" and not done.recoveries
    project.cli(cfg, "down", "--yes")


def test_a_stopped_node_is_said_at_once(project: Project) -> None:
    cfg = ready(project, "grpo-stopped", steps=400)
    run_id = project.cli(cfg, "run", "configs/standin.yaml").stdout.strip()
    project.fake.set_state("grpo-stopped", "STOPPED")
    for args in (["recover", run_id, "--interval", ".1"], ["status", run_id, "--watch", "--interval", ".1"]):
        done = grpoctl(cfg, *args, timeout=60)
        assert done.returncode == 3 and len(errors_of(done.stderr)) == 1, done.stderr
        assert "node STOPPED" in done.stderr and f"grpoctl recover {run_id}" in done.stderr
    assert stored(run_id)["state"] == "STOPPED" and creates(project, "grpo-stopped") == 1
    project.cli(cfg, "down", "--yes")


def test_up_waits_for_a_delete_in_progress_then_creates(project: Project) -> None:
    cfg = project.config(name="grpo-deleting", up_timeout_s=20)
    project.cli(cfg, "up")
    project.fake.script.delete_s = 1.5
    project.fake.delete_by_someone("grpo-deleting")
    assert project.fake.node_state("grpo-deleting") == "DELETING"
    up = project.cli(cfg, "up")
    assert "DELETING; waiting until it is gone" in up.stderr and "READY" in up.stdout
    assert creates(project, "grpo-deleting") == 2
    project.fake.script.delete_s = 0
    project.cli(cfg, "down", "--yes")


# -------------------------------------------------------------------------------- the laptop dies too


def test_laptop_killed_mid_recovery_then_recover_picks_it_up(project: Project) -> None:
    cfg = ready(project, "grpo-sigkill")
    project.fake.script.create_s = 3.0  # the recreation takes a while: the laptop dies during it
    hit = at_step(project, 5, lambda: project.fake.preempt("grpo-sigkill"))
    waiter = subprocess.Popen(
        [sys.executable, "-m", "grpoctl_testing.fake_tpu_cli", "--config-file", cfg,
         "run", "configs/standin.yaml", "--recover", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(1200):
            if creates(project, "grpo-sigkill") == 2:  # the recreation is under way
                break
            time.sleep(0.05)
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert hit and creates(project, "grpo-sigkill") == 2
    (record,) = RunStore().list()
    assert record.state == "RECOVERING" and record.recovery_pending["kind"] == "preemption"
    project.fake.script.create_s = 0.2
    resumed = project.cli(cfg, "recover", record.run_id, "--interval", "0.1")
    assert outcome(resumed.stdout) == (record.run_id, "SUCCEEDED")
    assert "picking up the recovery" in resumed.stderr
    assert creates(project, "grpo-sigkill") == 2  # the node the dead laptop asked for was used
    assert [r["kind"] for r in stored(record.run_id)["recoveries"]] == ["preemption"]
    project.cli(cfg, "down", "--yes")


# ------------------------------------------------------------------------------------ a multi-host slice


def test_one_dead_worker_in_a_ready_slice_is_recovered(project: Project) -> None:
    cfg = ready(project, "grpo-slice", accelerator_type="v4-16")  # 2 hosts
    hit = at_step(project, 5, lambda: project.fake.kill_worker("grpo-slice", 1))
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.1")
    run_id, final = outcome(ran.stdout)
    assert final == "SUCCEEDED" and hit
    (recovery,) = stored(run_id)["recoveries"]
    assert recovery["kind"] == "worker" and "w1 unreachable" in recovery["reason"]
    assert creates(project, "grpo-slice") == 2
    project.cli(cfg, "down", "--yes")


# ----------------------------------------------------------------------------------- API errors, budgets


def preempt_then_fail(project: Project, node: str, method: str, path: str, http: int) -> list[int]:
    """At step 5: `node` is preempted, and the fake API's next `method path` answers `http`."""

    def act() -> None:
        project.fake.fail_next(method, path, http=http)
        project.fake.preempt(node)

    return at_step(project, 5, act)


def test_api_errors_while_recreating_are_not_preemptions(project: Project) -> None:
    cfg = ready(project, "grpo-500")
    hit = preempt_then_fail(project, "grpo-500", "POST", "/nodes", 500)
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--max-preemptions", "1",
                      "--interval", "0.1", "--retry-wait", "0.2")
    run_id, final = outcome(ran.stdout)
    assert final == "SUCCEEDED" and hit
    assert "no preemption counted" in ran.stderr and "injected" in ran.stderr
    assert [r["kind"] for r in stored(run_id)["recoveries"]] == ["preemption"]
    project.cli(cfg, "down", "--yes")


def test_a_403_during_recovery_says_the_run_is_not_watched_and_how_to_resume(project: Project) -> None:
    cfg = ready(project, "grpo-403")
    preempt_then_fail(project, "grpo-403", "GET", "/nodes/grpo-403", 403)
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.1", code=2)
    line = one_line_error(ran)
    run_id = outcome(ran.stdout)[0]
    assert "roles/tpu.admin" in line and "not watched any more" in line
    assert f"grpoctl recover {run_id}" in line
    resumed = project.cli(cfg, "recover", run_id, "--interval", "0.1")
    assert outcome(resumed.stdout) == (run_id, "SUCCEEDED")
    project.cli(cfg, "down", "--yes")


def test_a_spent_budget_is_what_the_record_says(project: Project) -> None:
    cfg = ready(project, "grpo-budget")
    at_step(project, 5, lambda: project.fake.preempt("grpo-budget"))
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--max-preemptions", "0",
                      "--interval", "0.1", code=3)
    run_id, final = outcome(ran.stdout)
    assert final == "PREEMPTED" and "budget (0) spent" in one_line_error(ran)
    record = stored(run_id)
    assert record["state"] == "PREEMPTED" and "preemption budget (0) spent" in record["state_reason"]
    assert "budget (0) spent" in project.cli(cfg, "status", run_id).stdout
    project.cli(cfg, "down", "--yes")


# ------------------------------------------------------------------------- what the node is, and health


def test_an_existing_node_of_another_kind_is_refused_or_attached_with_a_warning(project: Project) -> None:
    api = cloud.TpuApi("proj", "us-east1-d", api_endpoint=project.fake.endpoint)
    req = cloud.NodeRequest(accelerator_type="v4-16", runtime_version="v2-alpha-tpuv6e", spot=False)
    cloud.wait_operation(api.create_node("grpo-other", req), "create", timeout_s=30, poll_s=0.05)
    cfg = project.config(name="grpo-other", accelerator_type="v6e-8", spot=True)
    refused = project.cli(cfg, "up", code=2)
    line = one_line_error(refused)
    assert "accelerator v4-16" in line and "spot=false" in line and "--attach-any" in line
    attached = project.cli(cfg, "--json", "up", "--attach-any")
    details = json.loads(attached.stdout)["details"]
    assert details["accelerator_type"] == "v4-16" and details["spot"] is False
    assert "warning:" in attached.stderr and "attached anyway" in attached.stderr
    project.cli(cfg, "down", "--yes")


def test_an_unhealthy_node_is_warned_about_before_launch_and_while_running(project: Project) -> None:
    cfg = ready(project, "grpo-health")
    project.fake.set_state("grpo-health", "READY", "TIMEOUT")
    up = project.cli(cfg, "up")
    assert "warning: health TIMEOUT" in up.stderr
    project.fake.set_state("grpo-health", "READY", "HEALTHY")
    at_step(project, 3, lambda: project.fake.set_state("grpo-health", "READY", "UNHEALTHY_MAINTENANCE"))
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--set", "steps=80", "--wait", "--interval", ".05")
    assert outcome(ran.stdout)[1] == "SUCCEEDED"
    assert ran.stderr.count("health UNHEALTHY_MAINTENANCE") == 1  # said once, not every poll
    run = project.cli(cfg, "run", "configs/standin.yaml")
    assert "warning: tpu: health UNHEALTHY_MAINTENANCE" in run.stderr  # before the launch
    project.cli(cfg, "down", "--yes")


# ------------------------------------------------------------------------------------------------ soak


def test_soak_three_random_hits_one_run_every_metrics_row_nothing_after_down(project: Project) -> None:
    """The small soak (benchmarks/soak_lifecycle.py runs >= 10 hits): preemptions and restarts at random
    moments of one run; it ends SUCCEEDED with the same run id and every step's metrics row once."""
    out = soak(project, node="grpo-soak", steps=60, hits=3, seed=7)
    assert out["state"] == "SUCCEEDED" and len(out["injected"]) == 3, out
    assert len(out["recoveries"]) == 3, out
    assert out["steps"] == list(range(1, 61))  # every step's row, once, across 4 VMs' lifetimes
    assert out["waiter_code"] == 3 and "stopped" in out["waiter_err"], out["waiter_err"]
    assert out["created_after_down"] == 0 and out["nodes_left"] == []


def test_a_finished_run_whose_vm_is_gone_before_fetch_is_recovered_with_its_history(project: Project):
    cfg = ready(project, "grpo-fetch")
    hit = at_step(project, 20, lambda: project.fake.preempt("grpo-fetch"))
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.1")
    run_id = outcome(ran.stdout)[0]
    assert hit and outcome(ran.stdout)[1] == "SUCCEEDED"
    project.fake.preempt("grpo-fetch")  # after SUCCEEDED, before fetch: the files go with the VM
    gone = project.cli(cfg, "fetch", run_id, code=3)
    assert "node PREEMPTED" in one_line_error(gone) and f"grpoctl recover {run_id}" in gone.stderr
    project.cli(cfg, "recover", run_id, "--interval", "0.1")
    project.cli(cfg, "fetch", run_id)
    rows = [json.loads(x) for x in (Path("runs") / run_id / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))  # every row, across three VMs
    project.cli(cfg, "down", "--yes")


def test_maintenance_under_recover_checkpoints_first_then_relaunches(project: Project) -> None:
    """UNHEALTHY_MAINTENANCE is a preemption notice: the job is stopped at once (TERM: it checkpoints) and
    relaunched on the node once the maintenance is over, same run id."""
    cfg = ready(project, "grpo-maint", steps=150)  # long enough for a look at the node (every 10th poll)

    def maintenance() -> None:  # over once grpoctl has acted on it (the record says RECOVERING)
        project.fake.set_state("grpo-maint", "READY", "UNHEALTHY_MAINTENANCE")
        for _ in range(2000):
            if any(r.state == "RECOVERING" for r in RunStore().list()):
                break
            time.sleep(0.02)
        project.fake.set_state("grpo-maint", "READY", "HEALTHY")

    hit = at_step(project, 3, maintenance)
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.05")
    run_id, final = outcome(ran.stdout)
    assert final == "SUCCEEDED" and hit
    (recovery,) = stored(run_id)["recoveries"]
    assert recovery["kind"] == "restart" and "UNHEALTHY_MAINTENANCE" in recovery["reason"]
    assert "stopping the job now so that it checkpoints first" in ran.stderr
    assert starts(project, run_id)[1] >= hit[0] and creates(project, "grpo-maint") == 1
    project.cli(cfg, "down", "--yes")
