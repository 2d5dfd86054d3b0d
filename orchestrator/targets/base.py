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
from typing import Any

from orchestrator.transport.base import Transport

Say = Callable[[str], None]  # one line of progress for a person; the caller renders it


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
    """What `status` shows about the machine itself, beside the runs."""

    state: str  # e.g. READY, CREATING, PREEMPTED, NOT_FOUND, REACHABLE
    healthy: bool
    details: dict[str, Any] = field(default_factory=dict)


class Target(ABC):
    """A named place to run: a laptop folder, a list of SSH hosts, or a Cloud TPU node."""

    name: str
    remote_dir: str  # the checkout on every worker
    python: str | None  # an interpreter to use instead of bootstrapping a venv
    # The extras of pyproject.toml that `sync` installs into the workers' venv (when `python` is unset).
    bootstrap_extras: tuple[str, ...] = ("trainer",)

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

    def preemption(self) -> str | None:
        """Asked when the workers stop answering: why the machine will not come back by itself (preempted,
        terminated, deleted), or None when it may (a network blip). Only a target with a control plane
        (the Cloud TPU API) can tell; the default is None."""
        return None

    def close(self) -> None:
        for t in self.transports():
            t.close()
