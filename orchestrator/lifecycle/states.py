"""Run states: the one vocabulary of a run's (and a worker's) life, and the rules between them.

STARTING   the launch has not finished (no pid on every worker yet): never judged LOST, never polled
RUNNING    the job is alive on every worker that answered
STALLED    alive, but its log has not grown for `stall_after_s`
SUCCEEDED  exit code 0 on every worker
FAILED     a worker's job exited non-zero (its exit file says so)
LOST       a job ended without an exit file on a machine that is still there (OOM killer, kill -9)
PREEMPTED  the machine is gone (spot preemption, a restart or repair, a dead worker VM): `recover` resumes
           it from its checkpoint with the same run id
STOPPED    a person stopped it: the node was deleted (`grpoctl down`, the console) or stopped; nothing is
           recreated until someone asks (`grpoctl recover RUN`)
RECOVERING a recovery was decided and is under way (persisted before the delete/create/relaunch): a
           `recover RUN` after the laptop died picks it up here
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class RunState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STALLED = "STALLED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"
    PREEMPTED = "PREEMPTED"
    RECOVERING = "RECOVERING"


# The job itself ended (a worker's final word): what its exit file, or the lack of one, says.
FINISHED = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.LOST})
# Nothing to poll until someone acts (`recover` relaunches PREEMPTED/STOPPED ones).
TERMINAL = FINISHED | {RunState.PREEMPTED, RunState.STOPPED}
# The launch (or a relaunch) is under way: the workers have no pid of this attempt yet.
IN_FLIGHT_LAUNCH = frozenset({RunState.STARTING, RunState.RECOVERING})
# Names earlier grpoctl versions stored.
_OLD_NAMES = {"LAUNCHING": RunState.STARTING, "UNREACHABLE": RunState.LOST}


def parse(name: str | RunState) -> RunState:
    """A stored state name as a RunState (older records said LAUNCHING for STARTING)."""
    if isinstance(name, RunState):
        return name
    return _OLD_NAMES.get(name) or RunState(name)


def is_terminal(state: str) -> bool:
    return parse(state) in TERMINAL


def is_finished(state: str) -> bool:
    """The job ended by itself (SUCCEEDED, FAILED, LOST): a phase bar shows no ETA any more."""
    return parse(state) in FINISHED


def is_failure(state: str) -> bool:
    """A worker or run that ended badly by its own doing (FAILED or LOST)."""
    return parse(state) in (RunState.FAILED, RunState.LOST)


def worker_state(exit_code: int | None, alive: bool) -> RunState:
    """One worker's job: the exit file decides (the wrapper writes it); else a live pid is RUNNING; else
    the job is gone without a word: LOST."""
    if exit_code is not None:
        return RunState.SUCCEEDED if exit_code == 0 else RunState.FAILED
    return RunState.RUNNING if alive else RunState.LOST


def combine(states: Iterable[str]) -> RunState:
    """One state for a multi-worker run: any failure wins, then loss, then running; all done: SUCCEEDED."""
    names = [parse(s) for s in states]
    for state in (RunState.FAILED, RunState.LOST, RunState.RUNNING):
        if state in names:
            return state
    return RunState.SUCCEEDED if names else RunState.LOST


def label(state: str, exit_code: int | None = None) -> str:
    """`FAILED(3)` for a failed job, else the state's name."""
    return f"FAILED({exit_code})" if parse(state) is RunState.FAILED else str(parse(state))
