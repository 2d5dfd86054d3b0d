"""What a run's workers are asked besides their status: stop the job, the last line of its log; and how a
run's phase and failure read. Polling and the decisions on it live in orchestrator/lifecycle/."""

from __future__ import annotations

from typing import Any

from orchestrator import recipes
from orchestrator.errors import GrpoctlError
from orchestrator.lifecycle.states import RunState, is_failure
from orchestrator.ops import env as env_ops
from orchestrator.ops import logs as logs_ops
from orchestrator.ops.fanout import fan_out
from orchestrator.ops.launch import paths_of
from orchestrator.runs import RunRecord
from orchestrator.transport.base import Transport


def phase_json(record: RunRecord) -> dict[str, Any] | None:
    """The `phase` field of `status --json`: what the run does now, with its own k/n and the ETA."""
    ev = record.last_progress
    if ev is None:
        return None
    eta = 0.0 if record.state is RunState.SUCCEEDED else ev.eta_s
    return {"name": ev.phase, "k": ev.k, "n": ev.n, "eta_s": eta, "phase_eta_s": ev.phase_eta_s,
            "detail": ev.detail, "text": ev.text}


def kill(target, record: RunRecord, *, workers: list[int] | None = None, grace_s: float = 10.0) -> list[str]:
    """TERM (then KILL) the run on the given workers (default: all); returns what each worker said."""
    script = recipes.kill(record.remote_dir, paths_of(record), grace_s)
    transports: list[Transport] = target.transports()
    chosen = [transports[i] for i in workers] if workers is not None else transports
    results = fan_out(chosen, lambda _i, t: t.run(script, timeout=grace_s + 30).stdout.strip())
    return [r.value or str(r.error) for r in results]


def failure_message(record: RunRecord) -> str:
    bad = [w for w in record.workers if is_failure(w.state)]
    parts = [
        f"{w.worker} ({w.host}) "
        + (f"exit code {w.exit_code}" if w.state is RunState.FAILED else "lost (no exit file)")
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
    try:  # the same values `logs` hides: local .env, the worker's .env, the run's secrets
        hidden = logs_ops.secret_values(target, record, worker=index)
    except GrpoctlError:  # a broken local .env must not hide why the job failed
        hidden = [*_local_env_values(), *record.env.values()]
    text = env_ops.redactor(hidden)(line[0])
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
