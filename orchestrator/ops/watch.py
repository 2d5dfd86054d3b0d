"""Poll runs on their workers, wait for them with fail-fast, stop them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import recipes
from orchestrator.errors import GrpoctlError, InfraError, JobFailed, PreemptedError
from orchestrator.ops import env as env_ops
from orchestrator.ops.fanout import fan_out
from orchestrator.ops.launch import paths_of
from orchestrator.runs import RunRecord, RunStore, utc_now_iso
from orchestrator.transport.base import Transport


@dataclass(frozen=True)
class Poll:
    """One look at a run: a status per worker (None where the worker could not be reached)."""

    statuses: list[recipes.WorkerStatus | None]
    errors: list[str]  # one line per unreachable worker

    @property
    def reachable(self) -> bool:
        return not self.errors

    @property
    def progress(self) -> recipes.Progress | None:
        first = self.statuses[0] if self.statuses else None
        return first.progress if first else None


def poll(target, record: RunRecord, *, timeout: float = 30, stall_after_s: float | None = None) -> Poll:
    """Probe every worker once and update `record` in place (not saved). Unreachable workers keep
    their last known state; the run's state is decided only from the workers that answered. A live
    worker whose log has not grown for `stall_after_s` is STALLED (SIGSTOPped, hung, deadlocked): the run
    shows STALLED until its log moves again."""
    script = recipes.status(record.remote_dir, paths_of(record))

    def probe(_: int, t: Transport) -> recipes.WorkerStatus:
        result = t.run(script, timeout=timeout)
        if not result.ok:  # e.g. the probe timed out: that says nothing about the job
            raise InfraError(f"{t.name}: status probe failed (exit {result.exit_code})")
        return recipes.parse_status(result.stdout)

    results = fan_out(target.transports(), probe)
    statuses = [r.value for r in results]
    errors = [str(r.error) for r in results if r.error is not None]
    for w, s in zip(record.workers, statuses, strict=True):
        if s is not None:
            w.state, w.exit_code = s.state, s.exit_code
            w.pid = s.pid or w.pid
            w.quiet_s = s.quiet_s
            if _stalled(s, stall_after_s):
                w.state = "STALLED"
            if s.progress:
                w.step, w.total = s.progress.step, s.progress.total
    answered = [s for s in statuses if s is not None]
    everyone_answered = bool(answered) and len(answered) == len(statuses)
    if everyone_answered or any(s.state in ("FAILED", "LOST") for s in answered):
        state = recipes.combine(answered)
        if state == "RUNNING" and any(_stalled(s, stall_after_s) for s in answered):
            state = "STALLED"
    else:
        state = record.state
    if state != record.state and state in recipes.TERMINAL:
        record.finished_at = utc_now_iso()
        record.ended_at_s = time.time()
    record.state = state
    if any(s.state == "RUNNING" for s in answered):
        record.alive_at_s = time.time()
    result = Poll(statuses, errors)
    progress = result.progress
    if progress:
        record.last_progress = progress_dict(progress)
    info = next((s.info for s in statuses if s is not None and s.info), None)
    if info:
        record.config_hash = info.get("config_hash") or record.config_hash
        record.wandb_url = info.get("wandb_url") or record.wandb_url
    return result


def progress_dict(progress: recipes.Progress) -> dict[str, Any]:
    """What a run record keeps of its last event (status --json shows it)."""
    return {
        "step": progress.step,
        "total": progress.total,
        "elapsed_s": progress.elapsed_s,
        "eta_s": progress.eta_s,
        "phase_eta_s": progress.phase_eta_s,
        "metrics": dict(progress.metrics or {}),
        "phase": progress.phase,
        "k": progress.k,
        "n": progress.n,
        "detail": progress.detail,
        "bytes_done": progress.bytes_done,
        "bytes_total": progress.bytes_total,
        "text": progress.text,
        "ledger": dict(progress.ledger) if progress.ledger else None,
    }


def phase_json(record: RunRecord) -> dict[str, Any] | None:
    """The `phase` field of `status --json`: what the run does now, with its own k/n and the ETA."""
    p = record.last_progress
    if not p:
        return None
    phase = p.get("phase") or "train"
    k, n = p.get("k"), p.get("n")
    if p.get("phase") is None:  # a record from before phases: its step is the train phase's k
        k, n = p.get("step"), p.get("total")
    return {"name": phase, "k": k, "n": n, "eta_s": 0.0 if record.state == "SUCCEEDED" else p.get("eta_s"),
            "phase_eta_s": p.get("phase_eta_s"),
            "detail": p.get("detail"), "text": p.get("text") or f"step {p.get('step')}/{p.get('total')}"}


def _stalled(status: recipes.WorkerStatus, stall_after_s: float | None) -> bool:
    return (
        stall_after_s is not None
        and status.state == "RUNNING"
        and status.quiet_s is not None
        and status.quiet_s >= stall_after_s
    )


def machine_gone(target) -> str | None:
    """When workers stop answering, ask the target's control plane (the Cloud TPU API) why: the reason
    the machine will not come back (preempted, terminated, deleted), or None when it may (a network blip,
    a target without an API, or the API unreachable too)."""
    try:
        return target.preemption()
    except InfraError:
        return None


def mark_preempted(record: RunRecord, reason: str) -> None:
    """The record of a run whose machine is gone: PREEMPTED (terminal until `--recover` relaunches it)."""
    record.state = "PREEMPTED"
    record.finished_at = record.finished_at or utc_now_iso()
    record.ended_at_s = record.ended_at_s or time.time()
    for w in record.workers:
        if w.state not in recipes.TERMINAL:
            w.state = "PREEMPTED"
    record.last_progress = {**(record.last_progress or {}), "eta_s": None, "preempted": reason}


def preempted_error(record: RunRecord, reason: str) -> PreemptedError:
    return PreemptedError(
        f"run {record.run_id}: {reason}, the job is gone (recorded PREEMPTED); relaunch it from its "
        f"last checkpoint, same run id: grpoctl recover {record.run_id} (or sop replay --recover)"
    )


def poll_or_unreachable(target, record: RunRecord, *, stall_after_s: float | None = None) -> Poll:
    """`poll`, but a target that cannot even list its workers (the TPU node is gone) counts as every
    worker unreachable instead of raising."""
    try:
        return poll(target, record, stall_after_s=stall_after_s)
    except InfraError as err:
        return Poll([None] * len(record.workers), [str(err)])


def kill(target, record: RunRecord, *, workers: list[int] | None = None, grace_s: float = 10.0) -> list[str]:
    """TERM (then KILL) the run on the given workers (default: all); returns what each worker said."""
    script = recipes.kill(record.remote_dir, paths_of(record), grace_s)
    transports: list[Transport] = target.transports()
    chosen = [transports[i] for i in workers] if workers is not None else transports
    results = fan_out(chosen, lambda _i, t: t.run(script, timeout=grace_s + 30).stdout.strip())
    return [r.value or str(r.error) for r in results]


def failure_message(record: RunRecord) -> str:
    bad = [w for w in record.workers if w.state in ("FAILED", "LOST")]
    parts = [
        f"{w.worker} ({w.host}) "
        + (f"exit code {w.exit_code}" if w.state == "FAILED" else "lost (no exit file)")
        for w in bad
    ]
    return f"run {record.run_id} failed on " + ", ".join(parts)


def log_hint(target, record: RunRecord, index: int) -> str:
    """`; w1 log: <its last line>`: why a job died is usually the last thing it printed (best effort)."""
    t = target.transports()[index]
    try:
        result = t.run(recipes.tail_log(record.remote_dir, record.log_path, 1), timeout=30)
    except GrpoctlError:
        return ""
    line = result.stdout.strip().splitlines()[-1:] if result.ok else []
    if not line:
        return ""
    text = env_ops.redactor([*_local_env_values(), *record.env.values()])(line[0])
    return f"; {record.workers[index].worker} log: {clip(text)}"


def clip(text: str, limit: int = 1000) -> str:
    """At most `limit` characters, cut between words (a config error lists every known key: never show
    half a key name)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;") + " ..."


def _local_env_values() -> list[str]:
    # The trainer never prints .env or -e values; this guards against a job that does.
    try:
        return list(env_ops.read_dotenv(".env").values())
    except GrpoctlError:  # a broken local .env must not hide why the job failed
        return []


OnPoll = Callable[[RunRecord, Poll], None]


def wait(
    target,
    record: RunRecord,
    store: RunStore | None = None,
    *,
    interval: float = 2.0,
    on_poll: OnPoll | None = None,
    unreachable_timeout: float = 900.0,
    fail_fast: bool = True,
    stall_after_s: float | None = None,
) -> RunRecord:
    """Poll until the run ends. Fail-fast: when one worker fails or is lost, stop the others and raise
    JobFailed naming the worker and its exit code. When workers stop answering, the target's API is asked
    at once: a preempted (or deleted) TPU node marks the record PREEMPTED and raises PreemptedError (exit 3)
    on the poll that noticed it. Otherwise raise InfraError when no worker answered for
    `unreachable_timeout` seconds; shorter drops are ridden out (the transport reconnects)."""
    last_contact, polls = time.monotonic(), 0
    while True:
        result = poll_or_unreachable(target, record, stall_after_s=stall_after_s)
        if result.reachable:
            last_contact = time.monotonic()
        if store is not None:
            store.save(record)
        if on_poll is not None:
            on_poll(record, result)
        # No answer, or a job gone without an exit file: a preempted VM looks like both.
        lost = any(w.state == "LOST" for w in record.workers)
        gone = machine_gone(target) if not result.reachable or lost else None
        if gone is not None:
            mark_preempted(record, gone)
            if store is not None:
                store.save(record)
            raise preempted_error(record, gone)
        failed = [i for i, w in enumerate(record.workers) if w.state in ("FAILED", "LOST")]
        if failed and fail_fast:
            others = [
                i for i, w in enumerate(record.workers) if i not in failed and w.state not in recipes.TERMINAL
            ]
            message = failure_message(record)
            hint = log_hint(target, record, failed[0])
            if others:
                kill(target, record, workers=others)
                poll(target, record)  # record the stopped workers' final states
                message += "; stopped " + ", ".join(record.workers[i].worker for i in others)
            record.state = "FAILED" if any(record.workers[i].state == "FAILED" for i in failed) else "LOST"
            if store is not None:
                store.save(record)
            raise JobFailed(message + hint)
        if record.state in recipes.TERMINAL:
            if record.state != "SUCCEEDED":
                bad = next(i for i, w in enumerate(record.workers) if w.state in ("FAILED", "LOST"))
                raise JobFailed(failure_message(record) + log_hint(target, record, bad))
            return record
        if time.monotonic() - last_contact > unreachable_timeout:
            raise InfraError(
                f"run {record.run_id}: workers unreachable for {unreachable_timeout:.0f} s: "
                + "; ".join(result.errors)
            )
        # Short runs end fast and long ones need no hammering: 0.25 s, 0.5 s, ... up to `interval`.
        time.sleep(min(interval, 0.25 * 2**polls))
        polls += 1
