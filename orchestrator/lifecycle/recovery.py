"""Acting on the monitor's decisions: wait for a run, and (with a policy) recover it.

Recovery keeps a run going across what happens to its machine: a preempted (or terminated) node is
recreated, a node that restarted or was repaired is relaunched on as it is, a slice with one dead worker VM
is recreated; the repo is re-synced, the `.env` pushed again and the run relaunched with the same run id
and run dir (new log/pid/exit files), so the trainer resumes from its latest checkpoint. Failures of the
job itself are relaunched only for the exit codes the user names, from a separate, smaller budget.

Budgets count recoveries, never attempts: an API error while recreating (a 500, no capacity yet) is
retried from its own budget. Every decision is saved in the run store before it is acted on: the record
says RECOVERING (with what is pending) before any delete or create, so a laptop killed mid-recovery loses
nothing: `grpoctl recover RUN` picks it up where it was. A `grpoctl down` (or a person deleting or
stopping the node) stops the spend: the run ends STOPPED and nothing is recreated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import GrpoctlError, InfraError, JobFailed, PreemptedError, RunStopped, UsageError
from orchestrator.lifecycle.monitor import Action, Decision, Monitor, OnDecision, OnPoll, probe
from orchestrator.lifecycle.states import RunState, is_failure, is_terminal
from orchestrator.ops import env as env_ops
from orchestrator.ops import launch as launch_ops
from orchestrator.ops import sync as sync_ops
from orchestrator.ops import watch as watch_ops
from orchestrator.ops.session import Session
from orchestrator.retry import Backoff, poll_until, retry_call
from orchestrator.runs import RunRecord, utc_now_iso

MACHINE_KINDS = ("preemption", "restart", "worker")  # the machine's fault: the preemption budget


@dataclass(frozen=True)
class RecoveryPolicy:
    max_preemptions: int = 20  # the machine's fault (preempted, restarted, a dead worker): generous
    max_failures: int = 2  # the job's fault: only for `on_exit_codes`, and only a few times
    on_exit_codes: frozenset[int] = field(default_factory=frozenset)
    env_file: str = ".env"  # pushed again to a recreated node when it exists locally
    retry_wait_s: float = 60.0  # between attempts to recreate a node (capacity comes back, a 500 passes)
    max_api_errors: int = 30  # failed attempts per recovery (API errors, no capacity): not preemptions


def prepare_workers(session: Session, env_file: str) -> None:
    """What a fresh VM needs before a relaunch: the checkout, the interpreter, the secrets."""
    sync_ops.sync_and_bootstrap(session)
    if Path(env_file).is_file():
        env_ops.push_env(session, env_file)


def preempted_error(record: RunRecord, reason: str) -> PreemptedError:
    return PreemptedError(
        f"run {record.run_id}: {reason}, the job is gone (recorded PREEMPTED); relaunch it from its "
        f"last checkpoint, same run id: grpoctl recover {record.run_id} (or sop replay --recover)"
    )


def stopped_error(record: RunRecord, reason: str) -> RunStopped:
    return RunStopped(
        f"run {record.run_id} stopped: {reason}; nothing was recreated (recorded STOPPED). To resume it "
        f"from its last checkpoint, same run id: grpoctl recover {record.run_id}"
    )


def final_error(record: RunRecord) -> GrpoctlError | None:
    """The error (and so the exit code) a watcher ends with for a run in this final state; None if none."""
    reason = record.state_reason or "the machine is gone"
    if record.state is RunState.PREEMPTED:
        return preempted_error(record, reason)
    if record.state is RunState.STOPPED:
        return stopped_error(record, reason)
    if is_failure(record.state):
        return JobFailed(watch_ops.failure_message(record))
    return None


def wait(
    session: Session,
    record: RunRecord,
    policy: RecoveryPolicy | None = None,
    *,
    interval: float = 15.0,
    on_poll: OnPoll | None = None,
    on_decision: Sequence[OnDecision] = (),
    unreachable_timeout: float = 900.0,
) -> RunRecord:
    """Poll until the run ends. With a policy, what the machine does to the run is recovered (and the
    chosen failures relaunched); without one, a lost machine raises (PREEMPTED, exit 3). Fail-fast: when
    one worker fails, the others are stopped and JobFailed names the worker and its exit code."""
    monitor = Monitor(
        session.target,
        record,
        session.store,
        stall_after_s=session.config.stall_after_s,
        unreachable_timeout=unreachable_timeout,
    )
    if on_poll is not None:
        monitor.on_decision.append(lambda rec, d: on_poll(rec, d.poll) if d.poll is not None else None)
    monitor.on_decision.extend(on_decision)
    return Recovery(session, record, policy, monitor).run(interval)


class Recovery:
    """The policy at work on one run: acts on each decision of its monitor."""

    def __init__(
        self, session: Session, record: RunRecord, policy: RecoveryPolicy | None, monitor: Monitor
    ) -> None:
        self.session, self.record, self.policy, self.monitor = session, record, policy, monitor
        self.sleep: Callable[[float], None] = time.sleep

    def run(self, interval: float) -> RunRecord:
        rec = self.record
        self._pick_up()
        # Short runs end fast and long ones need no hammering: waits of 0.25 s, 0.5 s, ... up to `interval`.
        ramp = Backoff(first_s=0.25, factor=2.0, max_s=interval, jitter=False)
        polls = 0  # waits since the last action
        while True:
            try:
                d = self.monitor.poll()
            except UsageError as err:  # the control plane refused (403): nobody can watch the run now
                raise UsageError(
                    f"run {rec.run_id}: {err}; the run is not watched any more (recorded {rec.state}): fix "
                    f"that, then resume watching (and recovering) it with grpoctl recover {rec.run_id}"
                ) from None
            for warning in d.warnings:
                self.session.say(f"{rec.run_id}: warning: {self.session.target_name}: {warning}")
            acting = d.action is Action.WAIT and self.policy is not None  # maintenance: act ahead of it
            maintenance = _maintenance(d.warnings) if acting else ""
            if maintenance:
                self._ahead_of_maintenance(maintenance)
                polls = 0
                continue
            if d.action is Action.DONE:
                return rec
            if d.action is Action.STOP:
                raise stopped_error(rec, d.reason)
            if d.action is Action.GIVE_UP:
                raise InfraError(f"run {rec.run_id}: {d.reason}")
            if d.action is Action.FAIL:
                self._failed(d)
            elif d.action is Action.RECOVER:
                if self.policy is None:
                    raise preempted_error(rec, d.reason)
                self._recover(d.kind, d.reason)
            else:
                for note in d.notes:
                    if note.startswith("the control plane"):
                        self.session.say(f"{rec.run_id}: workers unreachable and {note}; still watching")
                self.sleep(ramp.delay(polls))
                polls += 1
                continue
            polls = 0

    # ---- what a decision does ------------------------------------------------------------------------
    def _pick_up(self) -> None:
        """A run left mid-recovery (the laptop died) or stopped earlier: carry on, when there is a policy."""
        rec = self.record
        if self.policy is None:
            if is_terminal(rec.state):
                err = final_error(rec)
                if err is not None:
                    raise err
            return
        pending = rec.recovery_pending
        if rec.state is RunState.RECOVERING and pending:
            why = pending.get("reason")
            self.session.say(f"{rec.run_id}: picking up the recovery left unfinished ({why})")
            self._act(pending)
        elif rec.state in (RunState.PREEMPTED, RunState.STOPPED):  # `recover RUN`: the user asks for it
            reason = rec.state_reason or f"{rec.state} earlier"
            if rec.stop_requested:
                rec.stop_requested = None
                self.session.store.save(rec)
            self._recover("preemption", reason)

    def _ahead_of_maintenance(self, warning: str) -> None:
        """Maintenance is a preemption notice: the job is told to stop now (TERM: the trainer checkpoints
        the step it is on) and relaunched like after a restart, on the node once it is READY again."""
        rec = self.record
        self.session.say(f"{rec.run_id}: {warning}: stopping the job now so that it checkpoints first")
        watch_ops.kill(self.session.target, rec)
        self._recover("restart", f"{warning}: stopped ahead of it, checkpointed")

    def _failed(self, d: Decision) -> None:
        rec, policy = self.record, self.policy
        codes = {w.exit_code for w in rec.workers if w.state is RunState.FAILED}
        failures = sum(1 for r in rec.recoveries if r.get("kind") == "failure")
        if policy is not None and codes & policy.on_exit_codes and failures < policy.max_failures:
            self._recover("failure", f"exit code {sorted(c for c in codes if c is not None)[0]}")
            return
        raise JobFailed(self._fail_fast())

    def _fail_fast(self) -> str:
        """Stop the workers still running, record the final states; the message names who failed."""
        rec, target = self.record, self.session.target
        failed = [i for i, w in enumerate(rec.workers) if is_failure(w.state)]
        others = [i for i, w in enumerate(rec.workers) if i not in failed and not is_terminal(w.state)]
        message = watch_ops.failure_message(rec)
        hint = watch_ops.log_hint(target, rec, failed[0]) if failed else ""
        if others:
            watch_ops.kill(target, rec, workers=others)
            probe(target, rec)  # record the stopped workers' final states
            message += "; stopped " + ", ".join(rec.workers[i].worker for i in others)
        rec.state = RunState.FAILED if any(rec.workers[i].state is RunState.FAILED for i in failed) else (
            RunState.LOST
        )
        self.session.store.save(rec)
        return message + hint

    def _recover(self, kind: str, reason: str) -> None:
        """Persist the decision (RECOVERING, what is pending), then act; budgets checked first."""
        rec, policy = self.record, self.policy
        assert policy is not None
        if kind in MACHINE_KINDS:
            spent = sum(1 for r in rec.recoveries if r.get("kind") in MACHINE_KINDS)
            if spent >= policy.max_preemptions:
                rec.state, rec.recovery_pending = RunState.PREEMPTED, None
                budget = policy.max_preemptions
                rec.state_reason = f"{reason}; preemption budget ({budget}) spent: not recovered"
                rec.finished_at = rec.finished_at or utc_now_iso()
                self.session.store.save(rec)
                raise PreemptedError(
                    f"run {rec.run_id}: {reason}; preemption budget ({policy.max_preemptions}) spent "
                    f"(recorded PREEMPTED): grpoctl recover {rec.run_id} --max-preemptions N resumes it"
                )
        pending = {
            "at": utc_now_iso(),
            "kind": kind,
            "reason": reason,
            "step": rec.last_progress.step if rec.last_progress else None,
            "previous_log": rec.log_path,
            "deleted": False,
            # The ended attempt, for the time ledger: when it was launched and seen gone, its trainer's split.
            "attempt_launched_at_s": rec.launched_at_s,
            "detected_at_s": rec.ended_at_s or time.time(),
            "alive_at_s": rec.alive_at_s,
            "attempt_ledger": (rec.last_progress.ledger or None) if rec.last_progress else None,
        }
        rec.state, rec.state_reason, rec.recovery_pending = RunState.RECOVERING, reason, pending
        self.session.store.save(rec)  # before any delete or create: a crash from here on is picked up
        self._act(pending)

    def _act(self, pending: dict[str, Any]) -> None:
        """Delete/create/relaunch as `pending` says, retrying API errors from their own budget."""
        rec, policy, session = self.record, self.policy, self.session
        assert policy is not None
        session.target.stop_check = self._stop_reason

        def attempt() -> None:
            reason = self._stop_reason()  # `grpoctl down` before (or between) tries: nothing is recreated
            if reason:
                self._stopped(reason)
            try:
                self._attempt(pending)
            except RunStopped:
                self._stopped(self._stop_reason() or "stopped while recovering")

        def failed(errors: int, err: BaseException, wait_s: float) -> None:
            session.say(
                f"{rec.run_id}: recovery failed ({err}); next try in {wait_s:g} s "
                f"(attempt {errors} of {policy.max_api_errors}; no preemption counted)"
            )

        # API errors and no capacity may pass (a stopped run does not): max_api_errors retries, evenly spaced.
        wait_s = policy.retry_wait_s
        fixed = Backoff(attempts=policy.max_api_errors + 1, first_s=wait_s, max_s=wait_s, jitter=False)
        try:
            retry_call(
                attempt,
                retry_on=lambda err: isinstance(err, InfraError) and not isinstance(err, RunStopped),
                policy=fixed,
                sleep=self.sleep,
                on_retry=failed,
            )
        except RunStopped:
            raise
        except UsageError as err:  # refused (403, a bad request): only a person can fix it
            raise UsageError(
                f"run {rec.run_id}: recovery stopped: {err}; the run is not watched any more "
                f"(recorded {rec.state}): fix that, then resume with grpoctl recover {rec.run_id}"
            ) from None
        except InfraError as err:  # every try failed
            raise InfraError(
                f"run {rec.run_id}: recovery failed {fixed.attempts} times (last: {err}); recorded "
                f"RECOVERING: grpoctl recover {rec.run_id} tries again"
            ) from None
        finally:
            session.target.stop_check = None

    def _attempt(self, pending: dict[str, Any]) -> None:
        rec, session, target = self.record, self.session, self.session.target
        kind, reason = pending["kind"], pending["reason"]
        if pending.get("log") and pending["log"] == rec.log_path and self._attempt_alive():
            self._relaunched(pending)  # launched before the laptop died: nothing to redo
            return
        if kind in MACHINE_KINDS:
            verb = "recreating" if kind != "restart" else "relaunching on"
            session.say(
                f"{rec.run_id}: {reason}; {verb} {session.target_name} (a fresh disk: the run resumes "
                "from checkpoints kept off the VM, e.g. checkpoint.dir gs://...)"
            )
            if kind == "worker" and not pending.get("deleted"):  # the node is READY: delete it first
                target.down()
                pending["deleted"] = True
                session.store.save(rec)
            target.up()  # a PREEMPTED node is deleted and created again; a READY one is attached
            prepare_workers(session, self.policy.env_file if self.policy else ".env")
        # launch() clears stale TPU users itself (TpuTarget.before_launch), with the target's device paths
        launch_ops.renew_attempt(rec)  # new log paths, never the last attempt's (even after a fast failure)
        for w, fresh in zip(rec.workers, target.workers(), strict=True):
            w.host = fresh.host if fresh.port == 22 else f"{fresh.host}:{fresh.port}"
        rec.finished_at = None
        pending["log"] = rec.log_path
        session.store.save(rec)  # the new attempt's paths, before its job starts
        launch_ops.launch(target, rec)
        self._relaunched(pending)

    def _attempt_alive(self) -> bool:
        probe(self.session.target, self.record)
        return any(w.state in (RunState.RUNNING, RunState.SUCCEEDED) for w in self.record.workers)

    def _relaunched(self, pending: dict[str, Any]) -> None:
        rec = self.record
        keys = ("at", "kind", "reason", "step", "previous_log", "attempt_launched_at_s", "detected_at_s",
                "alive_at_s", "attempt_ledger")
        entry = {k: pending.get(k) for k in keys}
        entry["log"], entry["relaunched_at_s"] = rec.log_path, rec.launched_at_s
        rec.recoveries.append(entry)
        rec.state, rec.state_reason, rec.recovery_pending = RunState.RUNNING, None, None
        self.session.store.save(rec)
        self.monitor.relaunched()
        self.session.say(
            f"{rec.run_id}: relaunched ({entry['kind']} #{len(rec.recoveries)}), log {rec.log_path}"
        )

    def _stop_reason(self) -> str | None:
        """`grpoctl down` (another process) asked the run to stop: the store says so."""
        try:
            stored = self.session.store.get(self.record.run_id)
        except GrpoctlError:
            return None
        return stored.stop_requested

    def _stopped(self, reason: str) -> None:
        rec = self.record
        rec.state, rec.state_reason, rec.recovery_pending = RunState.STOPPED, reason, None
        rec.finished_at = rec.finished_at or utc_now_iso()
        self.session.store.save(rec)
        raise stopped_error(rec, reason)


def _maintenance(warnings: Sequence[str]) -> str:
    return next((w.split(" (")[0] for w in warnings if w.startswith("health UNHEALTHY_MAINTENANCE")), "")


# ---------------------------------------------------------------------------------------------- status


@dataclass
class Round:
    """One look at the runs `status` shows."""

    records: list[RunRecord]
    unreachable: list[str]  # `<run id>: <why>` lines, retried next round


def observe(
    records: Sequence[RunRecord],
    monitor_of: Callable[[RunRecord], Monitor | str],
    *,
    watch: bool,
    interval: float,
    on_round: Callable[[Round], None],
    sleep: Callable[[float], None] = time.sleep,
) -> list[RunRecord]:
    """Poll every unfinished run once (its decision recorded, never acted on) and hand the round to
    `on_round`; with `watch`, again every `interval` s until they all end. `monitor_of` gives a run's
    monitor, or why it cannot be polled (shown once; the stored record is shown as it is)."""
    records = list(records)
    monitors: dict[str, Monitor] = {}
    unpollable: set[str] = set()

    def one_round() -> list[RunRecord] | None:
        unreachable: list[str] = []
        for record in records:
            if is_terminal(record.state) or record.run_id in unpollable:
                continue
            if record.run_id not in monitors:
                got = monitor_of(record)
                if isinstance(got, str):
                    unreachable.append(f"{record.run_id}: {got}")
                    unpollable.add(record.run_id)
                    continue
                monitors[record.run_id] = got
            d = monitors[record.run_id].poll()
            if d.action is Action.WAIT:
                unreachable += [note for note in d.notes if note]
        on_round(Round(records, unreachable))
        if not watch or all(is_terminal(r.state) or r.run_id in unpollable for r in records):
            return records
        return None

    return poll_until(one_round, poll_s=interval, sleep=sleep)  # no deadline: until every run has ended
