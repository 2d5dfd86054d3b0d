"""Read a run's log from one worker: the tail, or followed until the run ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from orchestrator import recipes, untrusted
from orchestrator.errors import GrpoctlError, InfraError, UsageError, WorkerReadError
from orchestrator.ops import env as env_ops
from orchestrator.ops.launch import paths_of
from orchestrator.retry import poll_until
from orchestrator.runs import RunRecord
from orchestrator.transport.shell import GET_NOT_REGULAR


def _last_line(text: str) -> str:
    """A worker's last stderr line, made safe to print (it is worker text)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return untrusted.clean(lines[-1] if lines else "no error output", untrusted.FIELD)


def _transport(target, record: RunRecord, worker: int):
    transports = target.transports()
    if not 0 <= worker < len(transports):
        raise UsageError(f"--worker {worker}: run {record.run_id} has workers 0..{len(transports) - 1}")
    return transports[worker]


def secret_values(target, record: RunRecord, env_file: str | Path = ".env", *, worker: int = 0) -> list[str]:
    """Every value a log must not show: the local `.env`, the worker's `.env` and the run's `-e` file
    (read over the transport into memory only; a missing file adds nothing)."""
    found = list(env_ops.read_dotenv(env_file).values()) + list(record.env.values())
    t = _transport(target, record, worker)
    base = record.remote_dir.rstrip("/")
    for path in (f"{base}/.env", f"{base}/{paths_of(record).env}"):
        try:
            found += env_ops.parse_dotenv(untrusted.read(t, path, untrusted.ENV), path).values()
        except (FileNotFoundError, GrpoctlError):
            continue  # nothing there, or unreadable: the local values still apply
    return found


def select(text: str, *, events: bool) -> str:
    """The human lines of a log chunk (whole lines), or with `events` only its JSON event lines (the
    trainer prints most events twice: the JSON for grpoctl, a `[trainer ...]` line for people)."""
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if line.startswith(recipes.PROGRESS_PREFIX) == events)


def tail(target, record: RunRecord, *, worker: int = 0, lines: int = 200) -> str:
    t = _transport(target, record, worker)
    result = t.run(recipes.tail_log(record.remote_dir, record.log_path, lines), timeout=60)
    if not result.ok:
        raise InfraError(f"{t.name}: cannot read {record.log_path}: {_last_line(result.stderr)}")
    return result.stdout


def follow(
    target,
    record: RunRecord,
    emit: Callable[[str], None],
    *,
    worker: int = 0,
    interval: float = 1.0,
    max_unreachable_s: float = 300.0,
) -> str:
    """Stream new log bytes until the run ends on that worker; returns its final state label.

    Reads by byte offset each poll, so a dropped connection loses no output: the next read resumes.
    """
    t = _transport(target, record, worker)
    status_script = recipes.status(record.remote_dir, paths_of(record))
    offset, last_ok, pending = 0, time.monotonic(), ""

    def take(text: str, final: bool = False) -> None:
        # Emit whole lines only, so that redaction downstream never sees half a secret.
        nonlocal pending
        pending += text
        cut = len(pending) if final else pending.rfind("\n") + 1
        if cut:
            emit(pending[:cut])
            pending = pending[cut:]

    def poll() -> str | None:
        """New lines out; the run's final state label once it has ended (its last lines out too), else None.
        A worker that does not answer is asked again next poll, until unreachable for max_unreachable_s."""
        nonlocal offset, last_ok
        try:
            chunk = t.run(recipes.read_log_from(record.remote_dir, record.log_path, offset), timeout=60)
            state = recipes.parse_status(t.run(status_script, timeout=30).stdout)
            last_ok = time.monotonic()
        except InfraError:
            if time.monotonic() - last_ok > max_unreachable_s:
                raise
            return None
        if chunk.exit_code == GET_NOT_REGULAR:  # a log swapped for a device or FIFO: refuse, never hang
            raise WorkerReadError(f"{t.name}: {_last_line(chunk.stderr)}")
        if chunk.ok and chunk.stdout:
            # Bytes as received: a decoded text's length differs wherever the log is not valid UTF-8.
            offset += chunk.stdout_bytes if chunk.stdout_bytes is not None else len(chunk.stdout.encode())
            take(chunk.stdout)
        if not state.finished:
            return None
        final = t.run(recipes.read_log_from(record.remote_dir, record.log_path, offset), timeout=60)
        take(final.stdout if final.ok else "", final=True)
        return state.label

    return poll_until(poll, poll_s=interval)  # no deadline: a run's log is followed to its end
