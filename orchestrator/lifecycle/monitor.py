"""The monitor: one poll of a run's workers (and, when needed, one look at its machine) -> one decision.

Every "what is going on with this run?" question is answered here, once: is the job alive, did it end, is
the machine gone (preempted), coming back (restarting, repairing), stopped or deleted by a person, or is
one worker of a slice dead? `status`, `run --wait`, `run --recover`, `recover` and SOP waits all poll
through a Monitor; the recovery policy (recovery.py) acts on its decisions, `status` only records them.

The machine's control plane (the Cloud TPU API) is asked at most once per poll, and only when the workers
give a reason (silence, a job gone without an exit file, a failure) or every `facts_every` polls (health
and maintenance warnings). When the machine's facts change (READY again, new endpoints), the target's
cached node and connections are dropped, so the next poll reaches the machine as it is now.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from grpoctl_contract.progress import Event
from orchestrator import recipes
from orchestrator.errors import InfraError, UsageError
from orchestrator.lifecycle.states import IN_FLIGHT_LAUNCH, RunState, combine, is_failure, is_terminal
from orchestrator.ops.fanout import fan_out
from orchestrator.ops.launch import paths_of
from orchestrator.runs import RunRecord, RunStore, utc_now_iso
from orchestrator.targets.base import Condition, Machine
from orchestrator.transport.base import Transport

# A launch that has not written its pids after this long is not in flight any more (its process died):
# the run is polled like any other.
LAUNCH_GRACE_S = 600.0


@dataclass(frozen=True)
class Poll:
    """One look at a run: a status per worker (None where the worker could not be reached)."""

    statuses: list[recipes.WorkerStatus | None]
    errors: list[str]  # one line per unreachable worker

    @property
    def reachable(self) -> bool:
        return not self.errors

    @property
    def progress(self) -> Event | None:
        first = self.statuses[0] if self.statuses else None
        return first.progress if first else None


OnPoll = Callable[[RunRecord, Poll], None]


def probe(target, record: RunRecord, *, timeout: float = 30, stall_after_s: float | None = None) -> Poll:
    """Probe every worker once and update `record` in place (not saved). Unreachable workers keep
    their last known state; the run's state is decided only from the workers that answered. A live
    worker whose log has not grown for `stall_after_s` is STALLED (SIGSTOPped, hung, deadlocked): the run
    shows STALLED until its log moves again. A target that cannot even list its workers (its node is
    gone) counts as every worker unreachable."""
    script = recipes.status(record.remote_dir, paths_of(record))

    def one(_: int, t: Transport) -> recipes.WorkerStatus:
        result = t.run(script, timeout=timeout)
        if not result.ok:  # e.g. the probe timed out: that says nothing about the job
            raise InfraError(f"{t.name}: status probe failed (exit {result.exit_code})")
        return recipes.parse_status(result.stdout)

    try:
        results = fan_out(target.transports(), one)
    except InfraError as err:
        return Poll([None] * len(record.workers), [str(err)])
    statuses = [r.value for r in results]
    errors = [str(r.error) for r in results if r.error is not None]
    for w, s in zip(record.workers, statuses, strict=False):
        if s is not None:
            w.state, w.exit_code = s.state, s.exit_code
            w.pid = s.pid or w.pid
            w.quiet_s = s.quiet_s
            if _stalled(s, stall_after_s):
                w.state = RunState.STALLED
            if s.progress:
                w.step, w.total = s.progress.step, s.progress.total
    answered = [s for s in statuses if s is not None]
    everyone_answered = bool(answered) and len(answered) == len(statuses)
    state = record.state
    if everyone_answered or any(is_failure(s.state) for s in answered):
        state = combine(s.state for s in answered)
        if state is RunState.RUNNING and any(_stalled(s, stall_after_s) for s in answered):
            state = RunState.STALLED
    if state != record.state and is_terminal(state):
        record.finished_at = utc_now_iso()
        record.ended_at_s = time.time()  # the time ledger: when this attempt's end was seen
    record.state = state
    if any(s.state is RunState.RUNNING for s in answered):
        record.alive_at_s = time.time()  # the time ledger: the job was last seen alive then
    result = Poll(statuses, errors)
    if result.progress:
        record.last_progress = result.progress
    info = next((s.info for s in statuses if s is not None and s.info), None)
    if info:
        record.config_hash = info.get("config_hash") or record.config_hash
        record.wandb_url = info.get("wandb_url") or record.wandb_url
    return result


def _stalled(status: recipes.WorkerStatus, stall_after_s: float | None) -> bool:
    return (
        stall_after_s is not None
        and status.state is RunState.RUNNING
        and status.quiet_s is not None
        and status.quiet_s >= stall_after_s
    )


def launch_in_flight(record: RunRecord) -> bool:
    """A launch (or a recovery) is under way: its workers have no pid of this attempt yet. Such a run is
    STARTING (or RECOVERING), never LOST: there is nothing to poll yet."""
    if record.state is RunState.RECOVERING:
        return True
    if record.state not in IN_FLIGHT_LAUNCH or all(w.pid for w in record.workers):
        return False
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(record.updated_at)).total_seconds()
    except ValueError:
        return False
    return age < LAUNCH_GRACE_S


class Action(StrEnum):
    WAIT = "wait"  # keep polling: running, stalled, starting, unreachable for now, the node comes back
    DONE = "done"  # SUCCEEDED
    FAIL = "fail"  # the job failed (an exit code) or vanished on a live machine
    RECOVER = "recover"  # the machine lost the job (preempted, restarted, a dead worker): relaunch it
    STOP = "stop"  # a person stopped or deleted the machine (or ran `grpoctl down`): recreate nothing
    GIVE_UP = "give_up"  # no worker answered for too long and no control plane could say why


@dataclass(frozen=True)
class Decision:
    action: Action
    state: RunState  # the run's state after this poll
    reason: str = ""
    poll: Poll | None = None
    machine: Machine | None = None
    # RECOVER: how. "preemption" (a new machine: delete and create), "restart" (the machine is back by
    # itself: relaunch on it), "worker" (one worker's VM is dead in a live slice: delete and create).
    kind: str = ""
    warnings: tuple[str, ...] = ()  # new machine warnings (each said once per monitor)
    notes: tuple[str, ...] = ()  # unreachable workers and the like: shown, retried next poll


OnDecision = Callable[[RunRecord, Decision], None]


@dataclass
class Monitor:
    """Polls one run; `poll()` updates and saves its record and returns the decision.

    `on_decision` callbacks see every decision after it is saved (progress bars, notifications, a ledger).
    """

    target: Any
    record: RunRecord
    store: RunStore | None = None
    stall_after_s: float | None = None
    unreachable_timeout: float = 900.0  # no worker answers, and the machine is up (or cannot be asked)
    dead_worker_polls: int = 2  # one worker silent this many polls while the others answer: its VM died
    facts_every: int = 10  # polls between looks at a machine that gives no reason to look
    clock: Callable[[], float] = time.monotonic
    on_decision: list[OnDecision] = field(default_factory=list)
    machine: Machine | None = None  # the last look
    _polls: int = 0
    _last_contact: float = 0.0
    _contact_lost: bool = False  # workers went silent since they last answered with a live job
    _busy_seen: str = ""  # the machine was restarting/repairing since the job was last seen alive
    _silent: dict[int, int] = field(default_factory=dict)  # worker -> polls silent while others answered
    _warned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._last_contact = self.clock()

    def poll(self) -> Decision:
        decision = self._decide()
        rec = self.record
        if decision.state != rec.state and is_terminal(decision.state):
            rec.finished_at = rec.finished_at or utc_now_iso()
            rec.ended_at_s = rec.ended_at_s or time.time()
        rec.state = decision.state
        if decision.action in (Action.RECOVER, Action.STOP):
            rec.state_reason = decision.reason
            for w in rec.workers:
                if not is_terminal(w.state):
                    w.state = decision.state
            if rec.last_progress is not None:  # the job is gone: its ETA means nothing any more
                rec.last_progress = dataclasses.replace(rec.last_progress, eta_s=None)
        if self.store is not None:
            self.store.save(rec)  # also brings in what other processes wrote (a `down` asking to stop)
        for callback in self.on_decision:
            callback(rec, decision)
        return decision

    # ---- the decision ------------------------------------------------------------------------------
    def relaunched(self) -> None:
        """A new attempt started (a recovery): what this monitor learnt about the last one is forgotten."""
        self._contact_lost, self._busy_seen, self._silent = False, "", {}
        self._last_contact = self.clock()

    def _decide(self) -> Decision:
        rec = self.record
        self._polls += 1
        if rec.stop_requested:
            return Decision(Action.STOP, RunState.STOPPED, rec.stop_requested)
        if launch_in_flight(rec):
            return Decision(Action.WAIT, rec.state, "launch in flight")
        poll = probe(self.target, rec, stall_after_s=self.stall_after_s)
        now = self.clock()
        answered = [i for i, s in enumerate(poll.statuses) if s is not None]
        if poll.reachable:
            self._last_contact = now
        else:
            self._contact_lost = True
        for i, s in enumerate(poll.statuses):
            self._silent[i] = 0 if s is not None or not answered else self._silent.get(i, 0) + 1
        dead = [i for i, n in self._silent.items() if n >= self.dead_worker_polls]
        states = [w.state for w in rec.workers]
        trouble = not poll.reachable or any(is_failure(s) for s in states)
        machine, notes = None, list(poll.errors)
        if trouble or self._polls % self.facts_every == 1:
            machine, note = self._look()
            notes += [note] if note else []
        warnings = self._new_warnings(machine)
        decided = self._verdict(poll, machine, dead, now)
        if decided is not None:
            return Decision(**{**decided, "poll": poll, "machine": machine, "warnings": warnings})
        if all(w.state is RunState.SUCCEEDED for w in rec.workers) and rec.workers:
            return Decision(Action.DONE, RunState.SUCCEEDED, "", poll, machine, warnings=warnings)
        if poll.reachable and rec.state in (RunState.RUNNING, RunState.STALLED):
            self._contact_lost, self._busy_seen = False, ""
        return Decision(Action.WAIT, rec.state, "", poll, machine, warnings=warnings, notes=tuple(notes))

    def _verdict(
        self, poll: Poll, machine: Machine | None, dead: list[int], now: float
    ) -> dict[str, Any] | None:
        """The decisions a machine or a failed job forces; None to keep waiting (or DONE)."""
        rec = self.record
        if machine is not None:
            cond = machine.condition
            if cond is Condition.STOPPED:
                return _d(Action.STOP, RunState.STOPPED, f"{machine.state}: stopped by a person or a policy")
            if cond in (Condition.DELETED, Condition.DELETING):
                return _d(
                    Action.STOP,
                    RunState.STOPPED,
                    f"{machine.state}: deleted outside this run (a preempted node would stay, as PREEMPTED)",
                )
            if cond is Condition.GONE:
                return _d(Action.RECOVER, RunState.PREEMPTED, machine.state, kind="preemption")
            if cond is Condition.BUSY:
                self._busy_seen = machine.state
                return None  # it comes back by itself: wait, then see what is left of the job
            if dead:  # the machine is UP but a worker's VM does not answer while the others do
                names = ", ".join(rec.workers[i].worker for i in dead if i < len(rec.workers))
                why = f"{names} unreachable for {self.dead_worker_polls} polls while {machine.state}"
                return _d(Action.RECOVER, RunState.PREEMPTED, why + ": its VM is down", kind="worker")
        states = [w.state for w in rec.workers]
        if any(s is RunState.LOST for s in states) and (self._busy_seen or self._contact_lost) and (
            machine is not None and machine.condition is Condition.UP
        ):  # the job vanished while its machine was away: the machine restarted under it
            why = f"{self._busy_seen or 'unreachable'}, then READY: the job is gone"
            return _d(Action.RECOVER, RunState.PREEMPTED, why, kind="restart")
        if any(is_failure(s) for s in states):
            failed = RunState.FAILED if RunState.FAILED in states else RunState.LOST
            return _d(Action.FAIL, failed, "")
        up_or_unknown = machine is None or machine.condition is Condition.UP
        if up_or_unknown and not poll.reachable and now - self._last_contact > self.unreachable_timeout:
            return _d(
                Action.GIVE_UP,
                rec.state,
                f"workers unreachable for {self.unreachable_timeout:.0f} s: " + "; ".join(poll.errors),
            )
        return None

    def _look(self) -> tuple[Machine | None, str]:
        """Ask the control plane once; refresh the target when the machine changed."""
        try:
            machine = self.target.machine()
        except UsageError:
            raise  # refused (permissions): the caller says the run is not watched any more
        except InfraError as err:  # the API is unreachable too: keep riding it out
            return None, f"the control plane cannot be asked either ({err})"
        if machine is None:
            return None, ""
        before = self.machine
        changed = before is not None and (before.condition, before.endpoints) != (
            machine.condition,
            machine.endpoints,
        )
        if changed:
            self.target.refresh()  # READY again or new endpoints: reconnect to the machine as it is now
        self.machine = machine
        return machine, ""

    def _new_warnings(self, machine: Machine | None) -> tuple[str, ...]:
        fresh = tuple(w for w in (machine.warnings if machine else ()) if w not in self._warned)
        self._warned.update(fresh)
        return fresh


def _d(action: Action, state: RunState, reason: str, *, kind: str = "") -> dict[str, Any]:
    return {"action": action, "state": state, "reason": reason, "kind": kind}
