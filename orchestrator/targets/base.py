"""A Target is where a job runs: one or more workers, each reached through a Transport."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from orchestrator.transport.base import Transport


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

    def close(self) -> None:
        for t in self.transports():
            t.close()
