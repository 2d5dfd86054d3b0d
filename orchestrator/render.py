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

from grpoctl_contract.progress import fmt_duration
from orchestrator import ledger as ledger_mod
from orchestrator.ops import watch as watch_ops
from orchestrator.phaseview import PhaseView
from orchestrator.runs import RunRecord


def quiet_s(record: RunRecord) -> int:
    return max((w.quiet_s or 0 for w in record.workers), default=0)


def progress_text(record: RunRecord) -> str:
    """The run's phase with its own k/n (`train step 3/40`, `final sweep batch 2/11`) and the ETA."""
    phase = watch_ops.phase_json(record)
    if record.state == "STALLED":
        at = f" at {phase['text']}" if phase else ""
        return f"no output for {quiet_s(record)} s{at}"
    if phase is None:
        return "-"
    if record.is_terminal:
        p = record.last_progress or {}
        return f"step {p.get('step')}/{p.get('total')}" if p.get("total") else phase["text"]
    return f"{phase['text']} eta {fmt_duration(phase['eta_s'])}"


def phase_bar(record: RunRecord) -> ProgressBar | str:
    phase = watch_ops.phase_json(record)
    if phase is None or not phase["n"] or record.is_terminal:
        return ""
    return ProgressBar(total=phase["n"], completed=phase["k"] or 0, width=16)


def runs_table(records: list[RunRecord], *, bars: bool = False) -> Table:
    table = Table(box=None, pad_edge=False)
    # Narrow terminals squeeze the log path, never the run id (what every other command takes).
    table.add_column("run id", no_wrap=True, min_width=max((len(r.run_id) for r in records), default=6))
    table.add_column("target")
    table.add_column("state", no_wrap=True, min_width=9)
    if bars:  # a terminal: the current phase's own bar
        table.add_column("phase", no_wrap=True)
    for col in ("progress", "workers", "log"):
        table.add_column(col)
    for r in records:
        workers = " ".join(
            f"{w.worker}:{w.state if w.state != 'FAILED' else f'FAILED({w.exit_code})'}" for w in r.workers
        )
        state = r.state
        failed = [w for w in r.workers if w.state == "FAILED"]
        if state == "FAILED" and failed:
            state = f"FAILED({failed[0].exit_code})"
        cells = [r.run_id, r.target, state, *([phase_bar(r)] if bars else []), progress_text(r)]
        # Text, not markup: phase and detail are worker text (a `[link=...]` in them stays text)
        table.add_row(*(Text(c) if isinstance(c, str) else c for c in [*cells, workers, r.log_path]))
    return table


def identity_lines(record: RunRecord) -> list[str]:
    """What produced a run: the worker's commit at launch, the config hash, the W&B run page."""
    lines = [f"commit: {record.git_commit or 'unknown'}", f"config hash: {record.config_hash or 'unknown'}"]
    if record.wandb_url:
        lines.append(f"W&B: {record.wandb_url}")
    return lines


def run_ledger(record: RunRecord, prices: Mapping[str, Any] | None = None) -> ledger_mod.Ledger:
    return ledger_mod.run_ledger(record, now=time.time(), prices=prices)


def status_json(record: RunRecord, prices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`status --json` of one run: its record, its phase now, and its time ledger (chip-hours, cost)."""
    return {**record.to_json(), "phase": watch_ops.phase_json(record),
            "ledger": run_ledger(record, prices).to_json()}


def run_bar(err: Console, record: RunRecord, *, enabled: bool) -> tuple[PhaseView, watch_ops.OnPoll]:
    """A phase bar on stderr for a waited run, and the poll callback that moves it."""
    view = PhaseView(err, record.run_id, enabled=enabled)

    def on_poll(rec: RunRecord, poll: watch_ops.Poll) -> None:
        note = f"{len(poll.errors)} worker(s) unreachable, retrying" if poll.errors else ""
        if rec.state == "STALLED":
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
