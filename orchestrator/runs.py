r"""Run records: what was launched where, kept in SQLite in the user's state folder.

`status` reads them back after the laptop sleeps or the shell closes. The folder is `$GRPOCTL_STATE_DIR`,
else the platform's user state folder (platformdirs): `$XDG_STATE_HOME/grpoctl` or `~/.local/state/grpoctl`
on Linux, `~/Library/Application Support/grpoctl` on macOS, `%LOCALAPPDATA%\grpoctl` on Windows.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

from grpoctl_contract import progress
from orchestrator.errors import InfraError, UsageError
from orchestrator.lifecycle.states import RunState, parse

STATE_DIR_ENV = "GRPOCTL_STATE_DIR"


def state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_state_dir("grpoctl", appauthor=False))


def utc_stamp(now: datetime | None = None) -> str:
    """UTC `%Y%m%d_%H%M%S`, the seed's log-file stamp."""
    return (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")


def new_run_id(config_stem: str, ts: str) -> str:
    return f"{config_stem}-{ts}-{secrets.token_hex(2)}"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class WorkerRun:
    """One worker's share of a run: the same relative paths on every worker, its own pid and outcome."""

    worker: str  # "w0"
    host: str
    pid: int | None = None
    state: RunState = RunState.STARTING  # see orchestrator/lifecycle/states.py
    exit_code: int | None = None
    step: int | None = None
    total: int | None = None
    quiet_s: int | None = None  # seconds its log had not grown at the last poll (STALLED past a limit)


@dataclass
class RunRecord:
    run_id: str
    config: str  # path of the trainer config inside the checkout
    target: str
    target_kind: str
    remote_dir: str
    log_path: str  # relative to the checkout, identical on every worker
    pid_path: str
    exit_path: str
    run_dir: str
    ts: str
    # `--secret` values: they live in this process only (to launch, and relaunch on recovery), never in
    # the store, `status --json` or a report; what is kept is their names.
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    env_names: list[str] = field(default_factory=list)
    # `-e/--env` values: flags that are not secret (EVAL_FULL_SWEEP=1), stored and shown like the config.
    flags: dict[str, str] = field(default_factory=dict)
    trainer_args: list[str] = field(default_factory=list)
    workers: list[WorkerRun] = field(default_factory=list)
    state: RunState = RunState.STARTING
    git_commit: str | None = None  # the worker checkout's HEAD at launch
    config_hash: str | None = None  # the trainer's hash of its effective config (its info line)
    wandb_url: str | None = None  # the trainer's W&B run page, when online
    python: str | None = None
    created_at: str = field(default_factory=utc_now_iso)
    updated_at: str = field(default_factory=utc_now_iso)
    finished_at: str | None = None
    # The last event of the run's log (recipes.parse_progress_line); stored as progress.to_json.
    last_progress: progress.Event | None = None
    fetched_to: str | None = None
    # Appended by recovery: {"at", "kind", "reason", "step", "previous_log", "log"} per relaunch.
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    # Why the run is in its state, when the state alone does not say (PREEMPTED, STOPPED, a budget spent).
    state_reason: str | None = None
    # A recovery decided but not finished (the record is RECOVERING): what `recover` picks up after a crash.
    recovery_pending: dict[str, Any] | None = None
    # Set by `grpoctl down` (another process, maybe): whoever watches the run stops and recreates nothing.
    stop_requested: str | None = None
    # For the time ledger (orchestrator/ledger.py): when this attempt was launched and when its end was
    # seen (unix seconds), and what it ran on (the price table's key).
    launched_at_s: float | None = None
    ended_at_s: float | None = None
    alive_at_s: float | None = None  # the last poll that found the job running (work until then was done)
    accelerator_type: str | None = None
    spot: bool | None = None

    def __post_init__(self) -> None:
        self.env_names = sorted(set(self.env_names) | set(self.env))
        self.state = parse(self.state)
        for w in self.workers:
            w.state = parse(w.state)
        if isinstance(self.last_progress, dict):  # the stored form (to_json)
            self.last_progress = stored_event(self.last_progress)

    @property
    def config_stem(self) -> str:
        return Path(self.config).stem

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["env"]  # the values never leave the process (see `env`)
        data["last_progress"] = progress.to_json(self.last_progress) if self.last_progress else None
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(RunRecord)} - {"env"}
        # A record stored by an older grpoctl held the values: keep the names, drop the values.
        old_env = data.get("env") if isinstance(data.get("env"), dict) else {}
        data = {k: v for k, v in data.items() if k in known}
        data["env_names"] = sorted(set(data.get("env_names") or []) | set(old_env))
        data["workers"] = [WorkerRun(**w) for w in data.get("workers", [])]
        record = RunRecord(**data)
        record._stored = record.to_json()  # what the store held: `save` writes only what changed since
        return record


def stored_event(data: dict[str, Any]) -> progress.Event | None:
    """A run record's last event as stored. A record written before events were stored whole has no
    `event`: what it was follows from its phase (none at all: a progress line of a trainer before phases)."""
    if "event" not in data:
        phase = data.get("phase")
        data = {**data, "event": "done" if phase == "done" else "phase" if phase else "progress"}
    return progress.from_json(data)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id     TEXT PRIMARY KEY,
  created_at TEXT NOT NULL,
  target     TEXT NOT NULL,
  state      TEXT NOT NULL,
  record     TEXT NOT NULL
)
"""


class RunStore:
    """A small SQLite table of run records (one JSON document per run, indexed by id and time)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            folder = state_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "runs.sqlite"
        self.path = str(path)
        self._lock = threading.Lock()  # fan-out threads update worker rows of the same record
        with self._connect():  # creates the table; a corrupt file is reported (and moved aside) here
            pass

    @staticmethod
    def in_memory() -> RunStore:
        """For `--dry-run`: records live only as long as the process."""
        store = RunStore.__new__(RunStore)
        store.path = ":memory:"
        store._lock = threading.Lock()
        store._memory = sqlite3.connect(":memory:", check_same_thread=False)
        store._memory.execute(_SCHEMA)
        return store

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            with self._lock:
                try:
                    yield memory
                except BaseException:
                    memory.rollback()
                    raise
                memory.commit()
            return
        with self._lock:
            # The folder or the file may have been deleted since the last command: start afresh.
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = None
            try:
                db = sqlite3.connect(self.path, timeout=10)
                db.execute(_SCHEMA)
                yield db
                db.commit()
            except sqlite3.DatabaseError as err:
                raise self._store_error(err) from None
            finally:
                if db is not None:
                    db.close()

    def _store_error(self, err: sqlite3.DatabaseError) -> InfraError:
        """One line for a state database we cannot use; a corrupt one is moved aside (kept, not deleted)."""
        text = str(err)
        corrupt = "not a database" in text or "malformed" in text
        if not corrupt:  # locked, unwritable, a folder in the way: the user can fix it
            return InfraError(f"state database {self.path}: {text}")
        aside = f"{self.path}.corrupt-{utc_stamp()}"
        try:
            os.replace(self.path, aside)
        except OSError as move_err:
            return InfraError(f"state database {self.path} is unreadable ({text}); moving it: {move_err}")
        return InfraError(
            f"state database {self.path} was unreadable ({text}); moved it to {aside} (earlier run records "
            "are there); the next command starts a new one"
        )

    def save(self, record: RunRecord) -> None:
        """Write the fields this process changed since it read (or last saved) the record, and take every
        other field as the store has it now: two processes that update one run (a watcher's poll, a
        `fetch` saving `fetched_to`, `down` asking to stop) never undo each other's writes."""
        record.updated_at = utc_now_iso()
        mine = record.to_json()
        base: dict[str, Any] | None = getattr(record, "_stored", None)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # read-merge-write as one step against other processes
            row = db.execute("SELECT record FROM runs WHERE run_id = ?", (record.run_id,)).fetchone()
            merged = mine
            if row is not None and base is not None:
                merged = json.loads(row[0])
                merged.update({k: v for k, v in mine.items() if k not in base or base[k] != v})
            db.execute(
                "INSERT OR REPLACE INTO runs (run_id, created_at, target, state, record)"
                " VALUES (?, ?, ?, ?, ?)",
                (record.run_id, record.created_at, record.target, merged["state"], json.dumps(merged)),
            )
        _take_stored(record, merged, mine)

    def delete(self, run_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def get(self, run_id: str) -> RunRecord:
        """By full id, or by a unique prefix of one."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT record FROM runs WHERE run_id = ? OR run_id LIKE ? ESCAPE '\\' ORDER BY run_id",
                (run_id, _like_prefix(run_id)),
            ).fetchall()
        records = [RunRecord.from_json(json.loads(r[0])) for r in rows]
        exact = [r for r in records if r.run_id == run_id]
        if exact:
            return exact[0]
        if len(records) == 1:
            return records[0]
        if not records:
            raise UsageError(f"no run {run_id!r} in {self.path}")
        raise UsageError(f"run id prefix {run_id!r} is ambiguous ({len(records)} runs)")

    def list(self, *, target: str | None = None, limit: int = 50) -> list[RunRecord]:
        sql, args = "SELECT record FROM runs", []
        if target:
            sql, args = sql + " WHERE target = ?", [target]
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        with self._connect() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
        return [RunRecord.from_json(json.loads(r[0])) for r in rows]


def _take_stored(record: RunRecord, stored: dict[str, Any], mine: dict[str, Any]) -> None:
    """Bring `record` up to what the store holds (the fields other processes wrote) and remember that as
    the base of its next save."""
    theirs = [k for k, v in stored.items() if k in mine and mine[k] != v]
    if theirs:
        fresh = RunRecord.from_json(stored)
        for key in theirs:
            setattr(record, key, getattr(fresh, key))
    record._stored = stored


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"
