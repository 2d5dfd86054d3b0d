"""grpoctl on a `tpu` target, end to end: the CLI, the real google-cloud-tpu client, the fake TPU API,
workers that are loopback sshd servers, and a stand-in trainer that checkpoints and resumes."""

from __future__ import annotations

import getpass
import json
import stat
from pathlib import Path

from tpu_support import SECRET, Project, long_run, one_line_error, outcome, preempt_at_step

from orchestrator.cloud.api import LABEL_KEY, LABEL_VALUE

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def test_spot_node_two_workers_up_sync_env_run_status_fetch_down(project: Project) -> None:
    cfg = project.config(accelerator_type="v4-16")  # 2 hosts: every step fans out
    up = project.cli(cfg, "up")
    assert "tpu: READY (2 worker(s))" in up.stdout
    assert "CREATING" in up.stderr  # the progress display went through the states

    body = project.fake.creates()[-1].body
    assert body["schedulingConfig"] == {"spot": True}
    assert body["labels"][LABEL_KEY] == LABEL_VALUE
    pub = (project.key.parent / "grpoctl_ed25519.pub").read_text().split()
    assert body["metadata"]["ssh-keys"] == f"{getpass.getuser()}:{pub[0]} {pub[1]} {getpass.getuser()}"
    assert stat.S_IMODE(project.key.stat().st_mode) == 0o600
    assert any(r.path.endswith(":getGuestAttributes") for r in project.fake.requests)

    synced = project.cli(cfg, "sync")
    assert synced.stdout.count("HEAD") == 2
    pushed = project.cli(cfg, "env", "push")
    assert f"WANDB_API_KEY_len={len(SECRET)}" in pushed.stdout

    ran = project.cli(cfg, "run", "configs/standin.yaml", "--wait", "--interval", "0.1")
    run_id, state = outcome(ran.stdout)
    assert state == "SUCCEEDED"
    status = project.cli(cfg, "status", run_id)
    assert "target tpu: READY (health HEALTHY, workers 2)" in status.stdout and "SUCCEEDED" in status.stdout
    for i, worker in enumerate(project.node().workers):  # both VMs ran it, each from its own checkout
        run_dir = worker.home / "grpoctl-work" / "runs" / run_id
        assert json.loads((run_dir / f"worker{i}.json").read_text())["wandb_key_len"] == len(SECRET)
    project.cli(cfg, "fetch", run_id)
    assert json.loads((Path("runs") / run_id / "summary.json").read_text())["steps"] == 4

    refused = project.cli(cfg, "down", code=2)  # not a terminal and no --yes: nothing deleted
    assert "--yes" in one_line_error(refused) and project.node() is not None
    project.cli(cfg, "down", "--yes")
    assert project.node() is None and not project.fake.nodes


def test_preemption_mid_run_recovers_with_the_same_run_id(project: Project) -> None:
    long_run(project)
    cfg = project.config(name="grpo-spot")
    project.cli(cfg, "up")
    project.cli(cfg, "sync")
    project.cli(cfg, "env", "push")

    bucket = project.root / "bucket"
    preempted_at = preempt_at_step(project, bucket, "grpo-spot", 10)
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--recover", "--interval", "0.2")
    run_id, state = outcome(ran.stdout)
    assert state == "SUCCEEDED" and preempted_at
    assert "node PREEMPTED" in ran.stderr and "relaunched (preemption #1)" in ran.stderr

    starts = [int(x) for x in (bucket / run_id / "starts").read_text().split()]
    assert starts[0] == 0 and starts[1] >= preempted_at[0]  # resumed from its checkpoint, not from 0
    record = json.loads(project.cli(cfg, "--json", "status", run_id).stdout)
    assert record["state"] == "SUCCEEDED" and len(record["recoveries"]) == 1
    assert (
        record["recoveries"][0]["kind"] == "preemption"
        and record["recoveries"][0]["reason"] == "node PREEMPTED"
    )
    new_vm = project.node("grpo-spot").workers[0]  # a fresh VM: cloned, env pushed, same run dir
    summary = json.loads((new_vm.home / "grpoctl-work" / "runs" / run_id / "summary.json").read_text())
    assert summary["resumed_from"] == starts[1] and summary["wandb_key_len"] == len(SECRET)
    assert len([r for r in project.fake.creates() if r.query["nodeId"] == ["grpo-spot"]]) == 2
    project.cli(cfg, "down", "--yes")


SOP = """
name: spot_recovery
target: tpu
steps:
  - up
  - sync
  - env_push
  - run: {name: long, config: configs/standin.yaml, interval_s: 0.2}
  - fetch
  - down
"""


def test_sop_replay_recover_survives_a_preemption(project: Project) -> None:
    long_run(project)
    cfg = project.config(name="grpo-sop")
    Path("spot.yaml").write_text(SOP)
    preempted_at = preempt_at_step(project, project.root / "bucket", "grpo-sop", 8)
    result = project.cli(cfg, "sop", "replay", "spot.yaml", "--recover", "--report", "report.md")
    assert preempted_at and "relaunched (preemption #1)" in result.stderr
    report = Path("report.md").read_text()
    assert "recovery 1: preemption (node PREEMPTED)" in report and "**SUCCEEDED**" in report
    (summary,) = Path("runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["resumed_from"] >= preempted_at[0]
    assert not project.fake.nodes  # the SOP's `down` step deleted the recreated node
