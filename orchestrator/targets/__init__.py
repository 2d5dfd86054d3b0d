"""`build_target`: config entry -> Target (local, ssh, tpu), or its dry-run twin."""

from __future__ import annotations

from orchestrator.config import (
    LocalTargetConfig,
    RepoConfig,
    SshTargetConfig,
    TargetConfig,
    TpuTargetConfig,
)
from orchestrator.targets.base import Say, Target, TargetState, Worker, say_nothing
from orchestrator.targets.topology import TPU_BOOTSTRAP_EXTRAS, hosts_for_accelerator, parse_host
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring
from orchestrator.transport.recording import RecordingScript

__all__ = ["Target", "TargetState", "Worker", "build_target"]


def build_target(
    name: str,
    cfg: TargetConfig,
    repo_cfg: RepoConfig,
    *,
    dry_run: bool = False,
    accept_new_host_key: bool = False,
    script: RecordingScript | None = None,
    say: Say = say_nothing,
    tpu_wiring: TpuWiring = REAL_TPU_VM,
) -> Target:
    """Build the target `name`. Nothing connects here: transports connect on their first call.
    The target reports progress (a TPU node's states while it starts) to `say`, one line at a time.

    With `dry_run`, the target has the real one's name, worker count and remote_dir, but its transports
    are RecordingTransports sharing `script` (a fresh empty one by default: every command "succeeds").
    `tpu_wiring` is what a tpu target assumes about its VMs (a stand-in service passes its own).
    """
    if dry_run:
        return _dry_run_target(name, cfg, repo_cfg, script or RecordingScript())
    if isinstance(cfg, LocalTargetConfig):
        from orchestrator.targets.local import LocalTarget

        return LocalTarget(name, cfg, repo_cfg)
    if isinstance(cfg, SshTargetConfig):
        from orchestrator.targets.ssh import SshTarget

        return SshTarget(name, cfg, repo_cfg, accept_new_host_key=accept_new_host_key)
    if isinstance(cfg, TpuTargetConfig):
        from orchestrator.targets.tpu import TpuTarget  # google-cloud-tpu is imported only when needed

        return TpuTarget(
            name, cfg, repo_cfg, accept_new_host_key=accept_new_host_key, say=say, wiring=tpu_wiring
        )
    raise TypeError(f"unknown target config {type(cfg).__name__}")


def _dry_run_target(name: str, cfg: TargetConfig, repo_cfg: RepoConfig, script: RecordingScript) -> Target:
    from orchestrator.targets.dry_run import DryRunTarget
    from orchestrator.targets.local import local_remote_dir

    extras = Target.bootstrap_extras
    if isinstance(cfg, LocalTargetConfig):
        workers, remote_dir = [Worker(0, "localhost")], local_remote_dir(cfg)
    elif isinstance(cfg, SshTargetConfig):
        workers = [Worker(i, *parse_host(h)) for i, h in enumerate(cfg.hosts)]
        remote_dir = repo_cfg.remote_dir
    else:
        n = hosts_for_accelerator(cfg.accelerator_type)
        workers, remote_dir = [Worker(i, f"{cfg.name}-w{i}") for i in range(n)], repo_cfg.remote_dir
        extras = TPU_BOOTSTRAP_EXTRAS
    return DryRunTarget(name, cfg.kind, workers, remote_dir, cfg.python, script, bootstrap_extras=extras)
