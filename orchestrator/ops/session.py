"""A Session: the loaded config, the chosen target, the run store, and how to talk about them."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator import recipes
from orchestrator.config import GrpoctlConfig, RepoConfig, TargetConfig, load_config
from orchestrator.ops import dryrun
from orchestrator.runs import RunStore
from orchestrator.targets import Target, build_target
from orchestrator.targets.base import Say, say_nothing
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring
from orchestrator.transport.recording import RecordingScript


@dataclass
class Session:
    config: GrpoctlConfig
    target_name: str
    target_cfg: TargetConfig
    target: Target
    store: RunStore
    dry_run: bool = False
    script: RecordingScript | None = None  # the dry run's journal
    say: Say = say_nothing  # progress and warnings, one line each (the CLI sends them to stderr)

    @property
    def kind(self) -> str:
        return self.target_cfg.kind

    @property
    def repo(self) -> RepoConfig:
        return self.config.repo

    @property
    def remote_dir(self) -> str:
        return self.target.remote_dir

    @property
    def python(self) -> str:
        """The worker's interpreter: the one the target names; for the local target, this very
        interpreter (the laptop plays the VM and already has the trainer's packages); else the venv
        that `bootstrap` creates in the checkout."""
        if self.target.python:
            return self.target.python
        if self.kind == "local":
            return sys.executable
        return recipes.venv_python(self.remote_dir)

    def close(self) -> None:
        self.target.close()


def open_session(
    *,
    config: GrpoctlConfig | None = None,
    config_file: str | Path | None = None,
    target: str | None = None,
    dry_run: bool = False,
    accept_new_host_key: bool = False,
    store: RunStore | None = None,
    say: Say = say_nothing,
    extra_targets: dict[str, TargetConfig] | None = None,
    tpu_wiring: TpuWiring = REAL_TPU_VM,
) -> Session:
    """Load the config, pick the target (nothing connects yet) and open the run store.

    `extra_targets` (an SOP's inline targets) fill in names the config does not define.
    """
    cfg = config if config is not None else load_config(config_file)
    if extra_targets:
        merged = {**extra_targets, **cfg.targets}
        cfg = cfg.model_copy(update={"targets": merged})
    name, target_cfg = cfg.target(target)
    script = None
    if dry_run:
        script = RecordingScript(responder=dryrun.responder, files=dryrun.FakeRunFiles(), printer=say)
    built = build_target(
        name, target_cfg, cfg.repo, dry_run=dry_run, accept_new_host_key=accept_new_host_key, script=script,
        say=say, tpu_wiring=tpu_wiring,
    )
    if store is None:
        store = RunStore.in_memory() if dry_run else RunStore()
    if cfg.notify is not None and hasattr(built, "notify"):  # a node's watchdog says when it deletes itself
        built.notify = cfg.notify
    return Session(cfg, name, target_cfg, built, store, dry_run, script, say)
