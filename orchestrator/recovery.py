"""Preemption recovery: keep a run going across spot preemptions (`run --recover`, `sop replay --recover`).

While a run is watched, two signs make us ask the Cloud TPU API what happened to the machine: the
workers stop answering, or the job ends without an exit file (LOST). PREEMPTED, TERMINATED, a vanished
node or a SUSPENDED queued resource mean preemption: the node is recreated, the repo re-synced, the
`.env` pushed again and the run relaunched with the same run id and run dir (new log/pid/exit files),
so the trainer resumes from its latest checkpoint. Failures of the job itself are relaunched only for
the exit codes the user names, from a separate, smaller budget. Every recovery is appended to the run
record (and so shows in `status --json` and the SOP report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import InfraError, JobFailed, PreemptedError
from orchestrator.ops import env as env_ops
from orchestrator.ops import launch as launch_ops
from orchestrator.ops import sync as sync_ops
from orchestrator.ops import watch as watch_ops
from orchestrator.ops.session import Session
from orchestrator.runs import RunRecord, utc_now_iso


@dataclass(frozen=True)
class RecoveryPolicy:
    max_preemptions: int = 20  # the machine's fault: generous
    max_failures: int = 2  # the job's fault: only for `on_exit_codes`, and only a few times
    on_exit_codes: frozenset[int] = field(default_factory=frozenset)
    env_file: str = ".env"  # pushed again to a recreated node when it exists locally
    retry_wait_s: float = 60.0  # between attempts to recreate a preempted node (capacity comes back)


class _MachineGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _preemption(session: Session) -> str | None:
    """The API's verdict on the target machine; None for targets that cannot be preempted."""
    return session.target.preemption()


def prepare_workers(session: Session, env_file: str) -> None:
    """What a fresh VM needs before a relaunch: the checkout, the interpreter, the secrets."""
    sync_ops.sync_and_bootstrap(session)
    if Path(env_file).is_file():
        env_ops.push_env(session, env_file)


def _relaunch(session: Session, record: RunRecord, kind: str, reason: str, policy: RecoveryPolicy) -> None:
    entry = {
        "at": utc_now_iso(),
        "kind": kind,
        "reason": reason,
        "step": (record.last_progress or {}).get("step"),
        "previous_log": record.log_path,
        # The ended attempt, for the time ledger: when it was launched and seen gone, its trainer's split.
        "attempt_launched_at_s": record.launched_at_s,
        "detected_at_s": record.ended_at_s or time.time(),
        "alive_at_s": record.alive_at_s,
        "attempt_ledger": (record.last_progress or {}).get("ledger"),
    }
    target = session.target
    if kind == "preemption":
        session.say(
            f"{record.run_id}: {reason}; recreating {session.target_name} (a fresh disk: the run resumes "
            "from checkpoints kept off the VM, e.g. checkpoint.dir gs://...)"
        )
        target.up()
        prepare_workers(session, policy.env_file)
    # launch() clears stale TPU users itself (TpuTarget.before_launch), with the target's device paths
    launch_ops.renew_attempt(record)
    while record.log_path == entry["previous_log"]:  # log names have 1 s resolution: a fast failure
        time.sleep(0.2)
        launch_ops.renew_attempt(record)
    for w, fresh in zip(record.workers, target.workers(), strict=True):
        w.host = fresh.host if fresh.port == 22 else f"{fresh.host}:{fresh.port}"
    record.state, record.finished_at = "LAUNCHING", None
    launch_ops.launch(target, record)
    entry["log"] = record.log_path
    entry["relaunched_at_s"] = record.launched_at_s
    record.recoveries.append(entry)
    session.store.save(record)
    session.say(f"{record.run_id}: relaunched ({kind} #{len(record.recoveries)}), log {record.log_path}")


def wait_run(
    session: Session,
    record: RunRecord,
    policy: RecoveryPolicy | None,
    *,
    interval: float = 15.0,
    on_poll: watch_ops.OnPoll | None = None,
) -> RunRecord:
    """Wait for a run on the session's target: with a policy, preemptions (and the chosen failures) are
    recovered; without one, they raise like `watch.wait` (PREEMPTED, exit 3)."""
    if policy is not None:
        return wait_recovering(session, record, policy, interval=interval, on_poll=on_poll)
    return _wait(session, record, interval, on_poll)


def _wait(
    session: Session, record: RunRecord, interval: float, on_poll: watch_ops.OnPoll | None
) -> RunRecord:
    """`watch.wait` on the session's target, its store and its stall threshold."""
    return watch_ops.wait(
        session.target,
        record,
        session.store,
        interval=interval,
        on_poll=on_poll,
        stall_after_s=session.config.stall_after_s,
    )


def wait_recovering(
    session: Session,
    record: RunRecord,
    policy: RecoveryPolicy,
    *,
    interval: float = 15.0,
    on_poll: watch_ops.OnPoll | None = None,
) -> RunRecord:
    """`watch.wait`, but preemptions (and the chosen failures) are recovered instead of raised."""
    preemptions = sum(1 for r in record.recoveries if r.get("kind") == "preemption")
    failures = len(record.recoveries) - preemptions

    def watch_machine(rec: RunRecord, poll: watch_ops.Poll) -> None:
        if on_poll is not None:
            on_poll(rec, poll)
        if poll.errors:  # SSH down: a network blip, or the VM is gone? The API knows.
            try:
                reason = _preemption(session)
            except InfraError as err:  # the API is unreachable too: keep riding it out
                session.say(f"{rec.run_id}: workers and Cloud TPU API unreachable ({err}); still watching")
                return
            if reason is not None:
                raise _MachineGone(reason)

    while True:
        try:
            if record.state == "PREEMPTED":  # marked by an earlier wait without --recover: relaunch now
                raise _MachineGone((record.last_progress or {}).get("preempted", "preempted earlier"))
            return _wait(session, record, interval, watch_machine)
        except _MachineGone as gone:
            reason = gone.reason
        except (JobFailed, InfraError) as err:
            reason = _preemption(session)
            if reason is None:
                codes = {w.exit_code for w in record.workers if w.state == "FAILED"}
                if (
                    isinstance(err, JobFailed)
                    and codes & policy.on_exit_codes
                    and failures < policy.max_failures
                ):
                    failures += 1
                    _relaunch(session, record, "failure", f"exit code {sorted(codes)[0]}", policy)
                    continue
                raise
        while True:  # recreating can fail too (no spot capacity right now): try again later
            if preemptions >= policy.max_preemptions:
                raise PreemptedError(
                    f"run {record.run_id}: {reason}; preemption budget ({policy.max_preemptions}) spent"
                )
            preemptions += 1
            try:
                _relaunch(session, record, "preemption", reason, policy)
                break
            except InfraError as err:
                session.say(
                    f"{record.run_id}: recovery failed ({err}); next try in {policy.retry_wait_s:g} s"
                )
                time.sleep(policy.retry_wait_s)
