"""How the CLI shows runs: the status table, the progress text of a run, its identity lines, the JSON of
`status`, and the phase bars of a waited run or a bootstrap (callbacks the api layer calls)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator import ledger as ledger_mod
from orchestrator.lifecycle.monitor import OnPoll, Poll
from orchestrator.lifecycle.states import RunState, is_terminal, label
from orchestrator.ops import watch as watch_ops
from orchestrator.phaseview import PhaseView, eta_text
from orchestrator.runs import RunRecord


def quiet_s(record: RunRecord) -> int:
    return max((w.quiet_s or 0 for w in record.workers), default=0)


def progress_text(record: RunRecord) -> str:
    """The run's phase with its own k/n (`train step 3/40`, `final sweep batch 2/11`) and the ETA (the
    phase's own while the run's is unknown: a warm start, the start sweep)."""
    ev = record.last_progress
    if record.state is RunState.STALLED:
        at = f" at {ev.text}" if ev else ""
        return f"no output for {quiet_s(record)} s{at}"
    if record.state is RunState.RECOVERING:
        return f"recovering: {record.state_reason or 'relaunching'}"
    if ev is None:
        return "-"
    if is_terminal(record.state):
        return f"step {ev.step}/{ev.total}" if ev.total else ev.text
    return f"{ev.text} {eta_text(ev.eta_s, ev.phase_eta_s)}"


# Exit codes of a job ended by `grpoctl stop` (TERM, then KILL after the grace period): 128 + signal, the
# workers' (Linux) numbers, written out: Windows' `signal` module has no SIGKILL.
STOPPED_CODES = frozenset({128 + 15, 128 + 9})


def state_text(record: RunRecord) -> str:
    """RUNNING, SUCCEEDED, FAILED(code), STOPPED (a run `grpoctl stop` ended), ..."""
    failed = [w for w in record.workers if w.state is RunState.FAILED]
    if record.state is RunState.STOPPED or (
        record.state is RunState.FAILED and failed and all(w.exit_code in STOPPED_CODES for w in failed)
    ):
        return str(RunState.STOPPED)
    if record.state is RunState.FAILED and failed:  # the cause, not a peer stopped because of it (143)
        cause = next((w for w in failed if w.exit_code not in STOPPED_CODES), failed[0])
        return f"FAILED({cause.exit_code})"
    return str(record.state)


def phase_bar(record: RunRecord) -> ProgressBar | str:
    ev = record.last_progress
    if ev is None or not ev.n or is_terminal(record.state):
        return ""
    return ProgressBar(total=ev.n, completed=ev.k or 0, width=16)


def runs_table(records: list[RunRecord], *, bars: bool = False, width: int | None = None) -> Table:
    """One line a run in `width` columns (80 is enough): run id (never cut: every command takes it), state
    and progress (cut with an ellipsis, never wrapped); the target only when the runs have several. The
    rest (workers, log, commit) is `status RUN`'s (`details`). `bars`: a wide terminal's phase bars."""
    several = len({r.target for r in records}) > 1
    states = [state_text(r) for r in records]
    widths = {
        "run id": max((len(r.run_id) for r in records), default=6),
        "target": min(max((len(r.target) for r in records), default=6), 12) if several else 0,
        "state": max([9, *map(len, states)]),  # SUCCEEDED, FAILED(n), STOPPED
        "phase": 16 if bars else 0,
    }
    shown = [name for name, w in widths.items() if w]
    used = sum(widths.values()) + 2 * len(shown)  # two spaces between columns
    table = Table(box=None, pad_edge=False)
    for name in shown:
        table.add_column(name, no_wrap=True, min_width=widths[name], overflow="ellipsis")
    left = max(width - used, 4) if width else None
    table.add_column("progress", no_wrap=True, overflow="ellipsis", max_width=left)  # cut, never padded
    for r, state in zip(records, states, strict=True):
        cells = [r.run_id, *([r.target] if several else []), state, *([phase_bar(r)] if bars else [])]
        # Text, not markup: phase and detail are worker text (a `[link=...]` in them stays text)
        table.add_row(*(Text(c) if isinstance(c, str) else c for c in [*cells, progress_text(r)]))
    return table


def accuracy_text(summary: dict[str, Any]) -> str:
    """`accuracy 0.086 -> 0.168 (full eval sweep, start -> end)` (before GRPO step 1 -> after the last
    step), or the end alone; `` without one."""
    def pair(key: str) -> tuple[Any, Any]:
        return summary.get(f"eval_full_start/{key}"), summary.get(f"eval_full/{key}")

    start, end = pair("accuracy")
    if not isinstance(end, int | float):
        return ""
    if not isinstance(start, int | float):
        return f"accuracy {end:.3f} (full eval sweep at the end)"
    text = f"accuracy {start:.3f} -> {end:.3f}"
    s_start, s_end = pair("sampled_accuracy")  # eval_full_sampled
    if isinstance(s_start, int | float) and isinstance(s_end, int | float):
        text += f", sampled pass rate {s_start:.3f} -> {s_end:.3f}"
    return f"{text} (full eval sweep, start -> end)"


def details(record: RunRecord) -> list[str]:
    """`status RUN`: everything about one run, a line each (what the one-line table leaves out)."""
    workers = " ".join(f"{w.worker}:{label(w.state, w.exit_code)}@{w.host}" for w in record.workers)
    lines = [
        f"target: {record.target} ({record.target_kind})",
        f"config: {record.config}" + (f" {' '.join(record.trainer_args)}" if record.trainer_args else ""),
        f"workers: {workers}",
        f"log: {record.log_path}",
        f"created: {record.created_at}" + (f"  finished: {record.finished_at}" if record.finished_at else ""),
    ]
    if record.fetched_to:
        lines.append(f"fetched to: {record.fetched_to}")
    return lines + identity_lines(record)


def identity_lines(record: RunRecord) -> list[str]:
    """What produced a run: the worker's commit at launch, the config hash, the W&B run page."""
    lines = [f"commit: {record.git_commit or 'unknown'}", f"config hash: {record.config_hash or 'unknown'}"]
    if record.state_reason:  # what happened: PREEMPTED, STOPPED, a budget spent
        lines.append(f"{record.state}: {record.state_reason}")
    if record.wandb_url:
        lines.append(f"W&B: {record.wandb_url}")
    return lines


def run_ledger(record: RunRecord, prices: Mapping[str, Any] | None = None) -> ledger_mod.Ledger:
    return ledger_mod.run_ledger(record, now=time.time(), prices=prices)


def status_json(record: RunRecord, prices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`status --json` of one run: its record, its phase now, and its time ledger (chip-hours, cost)."""
    return {**record.to_json(), "phase": watch_ops.phase_json(record),
            "ledger": run_ledger(record, prices).to_json()}


def run_bar(err: Console, record: RunRecord, *, enabled: bool) -> tuple[PhaseView, OnPoll]:
    """A phase bar on stderr for a waited run, and the poll callback that moves it."""
    view = PhaseView(err, record.run_id, enabled=enabled)

    def on_poll(rec: RunRecord, poll: Poll) -> None:
        note = f"{len(poll.errors)} worker(s) unreachable, retrying" if poll.errors else ""
        if rec.state is RunState.STALLED:
            note = f"STALLED: no output for {quiet_s(rec)} s" + (f"; {note}" if note else "")
        view.show(rec.state, poll.progress, note)

    return view, on_poll


class BootstrapBar:
    """Bootstrap stages as a phase bar (the slowest worker's stage). It appears at the first stage: the git
    sync before it has no stages, and targets with their own interpreter have no bootstrap at all."""

    def __init__(self, console: Console, *, enabled: bool) -> None:
        self.view = PhaseView(console, "bootstrap", enabled=enabled)
        self.stages: dict[str, tuple[int, int, str]] = {}
        self.started = False
        self.lock = threading.Lock()  # each worker reports its stages from its own thread

    def on_stage(self, worker: str, k: int, n: int, label: str) -> None:
        with self.lock:
            if not self.started:
                self.view.__enter__()
                self.started = True
            self.stages[worker] = (k, n, label)
            name, (k, n, label) = min(self.stages.items(), key=lambda item: item[1][0])
        # k-1 stages are finished while stage k runs
        self.view.update("bootstrap", k - 1, n, text=f"stage {k}/{n}: {label} ({name.split()[0]})")

    def __enter__(self) -> BootstrapBar:
        return self

    def __exit__(self, *_: object) -> None:
        if self.started:
            self.view.close()
