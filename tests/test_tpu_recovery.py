"""Recovery through the library: a preemption whose first recreation hits a spot stock-out."""

from __future__ import annotations

import threading

from tpu_support import Project, long_run, preempt_at_step

from orchestrator.lifecycle.recovery import RecoveryPolicy, wait
from orchestrator.ops import env as env_ops
from orchestrator.ops import launch as launch_ops
from orchestrator.ops import sync as sync_ops
from orchestrator.ops.session import open_session

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def test_recreation_retries_until_spot_capacity_returns(project: Project) -> None:
    long_run(project)
    said: list[str] = []
    session = open_session(
        config_file=project.config(name="grpo-stockout"), say=said.append, tpu_wiring=project.wiring
    )
    session.target.say = said.append
    try:
        session.target.up()
        sync_ops.sync(session)
        env_ops.push_env(session, ".env")
        record = launch_ops.start_run(session, project.repo.config)

        preempted = preempt_at_step(project, project.root / "bucket", "grpo-stockout", 5)

        def stock_out_once() -> None:  # after the preemption, the first recreation finds no capacity
            while not preempted:
                threading.Event().wait(0.01)
            project.fake.script.quota_exhausted = True
            before = len(project.fake.creates())
            while len(project.fake.creates()) == before:
                threading.Event().wait(0.01)
            project.fake.script.quota_exhausted = False

        threading.Thread(target=stock_out_once, daemon=True).start()
        policy = RecoveryPolicy(max_preemptions=10, retry_wait_s=0.3)
        done = wait(session, record, policy, interval=0.2)
    finally:
        session.close()

    assert done.state == "SUCCEEDED" and len(done.recoveries) == 1
    assert any("recovery failed" in line and "quota exceeded (" in line for line in said)
    creates = [r for r in project.fake.creates() if r.query["nodeId"] == ["grpo-stockout"]]
    assert len(creates) >= 3  # the first node, at least one refused attempt, the replacement
    assert done.recoveries[0]["kind"] == "preemption" and done.recoveries[0]["reason"] == "node PREEMPTED"
    assert done.last_progress is not None and done.last_progress.step == 40
