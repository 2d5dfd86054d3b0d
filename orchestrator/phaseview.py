"""What a run (or a bootstrap) is doing now, for people: `run --wait`, `sync`, `sop replay`.

On a terminal, a rich progress bar whose bar and k/n belong to the current phase (it starts over when the
phase changes) with the ETA beside it. Elsewhere (CI logs, pipes), plain lines: one when the phase
changes, one at least every `plain_every_s` while it advances, and the last state when the view closes.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from grpoctl_contract.progress import Event, fmt_duration
from orchestrator.lifecycle.states import is_terminal


def phase_line(state: str, progress: Event | None) -> str:
    """`train step 3/40, eta 0:45` (or the run's state while no event has come)."""
    if progress is None:
        return state
    text = progress.text
    if not progress.done and not is_terminal(state):
        text += f", {eta_text(progress.eta_s, progress.phase_eta_s)}"
    return text


def eta_text(eta_s: float | None, phase_eta_s: float | None) -> str:
    """`eta 1:20`; before the run's ETA is known (warm start, start sweep), the phase's own: `phase eta
    0:40`; `eta ?` without either."""
    if eta_s is None and phase_eta_s is not None:
        return f"phase eta {fmt_duration(phase_eta_s)}"
    return f"eta {fmt_duration(eta_s)}"


class PhaseView:
    def __init__(self, console: Console, label: str, *, enabled: bool = True, plain_every_s: float = 30.0):
        self.console, self.label, self.enabled = console, label, enabled
        self.plain_every_s = plain_every_s
        self.live = enabled and console.is_terminal
        self._bar: Progress | None = None
        self._task = None
        self._phase: str | None = None
        self._printed: str | None = None
        self._printed_at = 0.0
        self._pending: str | None = None
        self._lock = threading.Lock()  # sync's workers report their stages from their own threads

    def __enter__(self) -> PhaseView:
        if self.live:
            # markup=False: the info is worker text (a phase's detail), never rich markup or a link
            columns = [
                TextColumn("{task.description}", markup=False), BarColumn(),
                TextColumn("{task.fields[info]}", markup=False),
            ]
            self._bar = Progress(*columns, console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=None, info="starting")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.enabled and self._pending is not None and self._pending != self._printed:
            self._say(self._pending)

    def _say(self, line: str) -> None:
        self.console.print(f"{self.label}: {line}", markup=False, highlight=False)
        self._printed, self._printed_at = line, time.monotonic()

    def update(
        self, phase: str, k: int | None = None, n: int | None = None, *, text: str, info: str = ""
    ) -> None:
        """`phase` names the bar (a new one starts it over at k of n); `text` says what it does."""
        if not self.enabled:
            return
        with self._lock:
            self._update(phase, k, n, text, info)

    def _update(self, phase: str, k: int | None, n: int | None, text: str, info: str) -> None:
        line = text + (f" ({info})" if info else "")
        if self._bar is not None and self._task is not None:
            if phase != self._phase:
                self._bar.reset(self._task, total=n or None)
            self._bar.update(self._task, total=n or None, completed=k or 0, info=line)
        else:
            self._pending = line
            changed = phase != self._phase
            due = changed or time.monotonic() - self._printed_at >= self.plain_every_s
            if due and line != self._printed:
                self._say(line)
        self._phase = phase

    def show(self, state: str, progress: Event | None, note: str = "") -> None:
        """A run's last poll: its phase bar, or its state while no event has come."""
        if progress is None:
            self.update(state, text=state, info=note)
            return
        self.update(progress.phase, progress.k, progress.n, text=phase_line(state, progress), info=note)
