"""SOP files: a procedure as data (YAML), replayed step by step, resumable, with a Markdown report.

schema.py   the file model: typed steps, parsing and checking (one-line errors)
state.py    what a replay remembers between invocations (the state file beside the report)
replay.py   runs the steps through `orchestrator.api`, one handler per step type
report.py   the Markdown report, and each step spelled as the grpoctl command that does it by hand
"""

from orchestrator.sop.replay import default_report_path, replay
from orchestrator.sop.report import write_report
from orchestrator.sop.schema import Sop, load_sop, parse_sop, step_id
from orchestrator.sop.state import ReplayResult, ReplayState, StepState

__all__ = [
    "ReplayResult",
    "ReplayState",
    "Sop",
    "StepState",
    "default_report_path",
    "load_sop",
    "parse_sop",
    "replay",
    "step_id",
    "write_report",
]
