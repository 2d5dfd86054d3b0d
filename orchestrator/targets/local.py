"""LocalTarget: one worker, this machine; the checkout lives under the configured workdir."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from orchestrator.config import LocalTargetConfig, RepoConfig
from orchestrator.errors import UsageError
from orchestrator.targets.base import Target, TargetState, Worker
from orchestrator.transport.base import Transport
from orchestrator.transport.local import LOCAL_TOOLS, LOCAL_TOOLS_NEEDED, LocalTransport

SCHEMA_FILE = "trainer/config.py"  # the project's own trainer (a checkout of another trainer lacks it)


def missing_tools() -> list[str]:
    return [tool for tool in LOCAL_TOOLS if shutil.which(tool) is None]


def has_jax() -> bool:
    return importlib.util.find_spec("jax") is not None


def jax_missing_reason(python: str | None, checkout: Path) -> str | None:
    """Why the project's trainer cannot start here: this very interpreter runs it (no `python` set) and has
    no jax (the laptop-only install). None when it can, or when this cannot be told from here."""
    if python is not None or not (checkout / SCHEMA_FILE).is_file():
        return None
    if has_jax():
        return None
    return (
        f"the local target runs the trainer with {sys.executable}, which has no jax (a laptop-only install): "
        "pip install -e '.[trainer]', or set the local target's `python` to an interpreter that has it"
    )


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

    def before_launch(self, remote_dir: str, *, force: bool = False) -> None:
        """Refuse, in one line and before anything starts, what would only fail after the launch."""
        missing = missing_tools()
        if missing:
            raise UsageError(f"{LOCAL_TOOLS_NEEDED} (missing here: {', '.join(missing)})")
        reason = jax_missing_reason(self.python, Path(remote_dir))
        if reason:
            raise UsageError(reason)

    def state(self) -> TargetState:
        return TargetState("READY", healthy=True, details={"workdir": str(self.workdir)})
