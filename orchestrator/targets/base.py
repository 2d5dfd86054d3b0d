"""A Target is where a job runs: one or more workers, each reached through a Transport.

The whole interface is declared here: two abstract methods, and optional hooks with do-nothing defaults
that a target overrides when it has something to do (a TPU VM: stale chip users, preemption, libtpu).
Callers call the hooks directly; none asks whether a target has one. A target never prints: it tells
`say` (a callback its builder passes; by default nothing) and the caller decides where lines go.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orchestrator.transport.base import Transport

Say = Callable[[str], None]  # one line of progress for a person; the caller renders it
COORDINATOR_PORT = 8476  # jax.distributed's customary coordinator port (on worker 0 of a multi-worker run)


def say_nothing(_: str) -> None:
    """The default `say`: a target built without a listener stays silent."""


@dataclass(frozen=True)
class Worker:
    index: int
    host: str  # "localhost" for the local target
    port: int = 22
    # How the other workers reach this one (a TPU VM's internal IP); "" = `host`.
    peer_host: str = ""

    @property
    def label(self) -> str:
        return f"w{self.index}"


@dataclass
class TargetState:
    """What `status` and `up` show about the machine itself, beside the runs."""

    state: str  # e.g. READY, CREATING, PREEMPTED, NOT_FOUND, REACHABLE
    healthy: bool
    details: dict[str, Any] = field(default_factory=dict)
    # What the config calls the target and its kind, and how many workers it has: `api.up` fills them in
    # (a target's own `state()` reports only what it sees of the machine).
    target: str = ""
    kind: str = ""
    workers: int = 0


class Condition(StrEnum):
    """What a machine's control-plane state means for a job on it (the target maps its own states)."""

    UP = "up"  # running: its workers should answer
    BUSY = "busy"  # creating, starting, restarting, repairing, reimaging: it comes back by itself
    GONE = "gone"  # preempted or terminated: only a new machine runs the job again
    DELETED = "deleted"  # not found: someone deleted it (a preempted node stays, as PREEMPTED)
    DELETING = "deleting"  # someone is deleting it
    STOPPED = "stopped"  # stopped (or stopping) by a person: theirs to start again


@dataclass(frozen=True)
class Machine:
    """One look at the machine through its control plane: the facts a run's monitor acts on."""

    condition: Condition
    state: str  # in the control plane's words, e.g. "node PREEMPTED", "queued resource SUSPENDED"
    accelerator_type: str | None = None
    spot: bool | None = None
    endpoints: tuple[str, ...] = ()  # worker addresses; () while the machine has none
    warnings: tuple[str, ...] = ()  # e.g. "health TIMEOUT", "health UNHEALTHY_MAINTENANCE (...)"


class Target(ABC):
    """A named place to run: a laptop folder, a list of SSH hosts, or a Cloud TPU node."""

    name: str
    remote_dir: str  # the checkout on every worker
    python: str | None  # an interpreter to use instead of bootstrapping a venv
    # The extras of pyproject.toml that `sync` installs into the workers' venv (when `python` is unset).
    bootstrap_extras: tuple[str, ...] = ("trainer",)
    # Where worker 0's jax.distributed coordinator listens when the run has several workers.
    coordinator_port: int = COORDINATOR_PORT

    @abstractmethod
    def workers(self) -> list[Worker]: ...

    @abstractmethod
    def transports(self) -> list[Transport]:
        """One kept-open transport per worker, in worker order (cached: call freely)."""

    def up(self) -> None:
        """Make the target exist and be reachable (provision, attach, or just connect)."""
        for t in self.transports():
            t.run("true", timeout=30)

    def down(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release what `up` provisioned. Nothing to release for fixed hosts."""

    def state(self) -> TargetState:
        return TargetState(state="UNKNOWN", healthy=True)

    def before_launch(self, remote_dir: str, *, force: bool = False) -> None:  # noqa: B027 (optional hook)
        """Right before a job starts on every worker: clear what would stand in its way (a TPU VM: stale
        processes holding the chips). `force` is the launch's --force. Nothing to clear by default."""

    def machine(self) -> Machine | None:
        """One look at the machine through its control plane (the Cloud TPU API), or None for targets
        without one (SSH hosts, this machine): their workers answer or they do not. Raises InfraError when
        the control plane cannot be asked, UsageError when it refuses (permissions)."""
        return None

    def refresh(self) -> None:  # noqa: B027 (an optional hook)
        """Forget what is cached about the machine (a node's endpoints, open connections): the next call
        looks again. Called when the machine changed under a run (restarted, recreated, READY again)."""

    # Asked while the target waits for a machine (e.g. a node being created during a recovery): a reason
    # to stop waiting (a `grpoctl down` meanwhile), or None. Set by whoever acts on a run.
    stop_check: Callable[[], str | None] | None = None

    def close(self) -> None:
        for t in self.transports():
            t.close()
