"""LocalTarget: one worker, this machine; the checkout lives under the configured workdir."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import LocalTargetConfig, RepoConfig
from orchestrator.targets.base import Target, TargetState, Worker
from orchestrator.transport.base import Transport
from orchestrator.transport.local import LocalTransport


def local_remote_dir(cfg: LocalTargetConfig) -> str:
    """`<workdir, resolved against the current folder>/grpoctl-work` (repo.remote_dir is for remote hosts)."""
    return str(Path(cfg.workdir).expanduser().resolve() / "grpoctl-work")


class LocalTarget(Target):
    def __init__(
        self, name: str, cfg: LocalTargetConfig, repo_cfg: RepoConfig, *, transport: Transport | None = None
    ) -> None:
        del repo_cfg  # the checkout location comes from `workdir` on this target
        self.name = name
        self.remote_dir = local_remote_dir(cfg)
        self.workdir = Path(self.remote_dir).parent
        self.python = cfg.python
        self._transport = transport if transport is not None else LocalTransport("w0 localhost")

    def workers(self) -> list[Worker]:
        return [Worker(0, "localhost")]

    def transports(self) -> list[Transport]:
        return [self._transport]

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().up()

    def state(self) -> TargetState:
        return TargetState("READY", healthy=True, details={"workdir": str(self.workdir)})
