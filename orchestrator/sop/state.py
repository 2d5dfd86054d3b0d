"""What a replay remembers between invocations: per step its status, timing, the run it launched and the
report lines; per run its fetched summary; the comparison and the verdict. Saved as JSON beside the report
(`<report stem>.state.json`) after every step, so a second replay skips what is done."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError


@dataclass
class StepState:
    status: str = "pending"  # pending, running, done, failed, skipped
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    command: str = ""  # the grpoctl command that does the same by hand
    details: list[str] = field(default_factory=list)  # Markdown lines for the report
    run_id: str | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    remote_commands: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # ledger categories of the step's time


@dataclass
class ReplayState:
    sop: str
    steps: dict[str, StepState] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # run name -> summary
    comparison: str | None = None  # the figures behind the verdicts (Markdown)
    verdict: str | None = None  # one line per verdict, each once (compare.Comparison.summary_lines)
    verdict_json: dict[str, Any] | None = None  # the same as `grpoctl --json compare` gives it
    plots: dict[str, str] = field(default_factory=dict)  # compare step id -> its plot, beside the report
    key_numbers: list[str] = field(default_factory=list)  # each arm's start -> end with its interval
    # the verdict lines about these trajectories (compare.Comparison.trajectory_lines): shown apart
    trajectory_lines: list[str] = field(default_factory=list)
    preflight: dict[str, str] = field(default_factory=dict)  # run name -> the preflight's one line
    # run name -> whether the preflight's report said it fits (None: no preflight could run here)
    preflight_fits: dict[str, bool | None] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        tmp.replace(path)

    @staticmethod
    def load(path: Path, sop: str) -> ReplayState:
        if not path.is_file():
            return ReplayState(sop)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            steps = {k: StepState(**v) for k, v in data.get("steps", {}).items()}
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"{path}: unreadable SOP state (use --fresh)") from None
        # Every other field as saved (a field the file lacks keeps its default): `sop` is this replay's.
        rest = {f.name for f in fields(ReplayState)} - {"sop", "steps"}
        return ReplayState(sop, steps, **{k: v for k, v in data.items() if k in rest})


@dataclass
class ReplayResult:
    report_path: Path
    state_path: Path
    state: ReplayState

    @property
    def verdict(self) -> str | None:
        return self.state.verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "report": str(self.report_path),
            "state": str(self.state_path),
            "verdict": self.verdict,
            "method_verdict": (self.state.verdict_json or {}).get("method_verdict"),
            "key_numbers": self.state.key_numbers,
            "steps": {k: v.status for k, v in self.state.steps.items()},
            "runs": {k: v.run_id for k, v in self.state.steps.items() if v.run_id},
            "preflight": self.state.preflight,
        }
