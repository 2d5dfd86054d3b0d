"""TpuWiring: what TpuTarget assumes about the inside of a Cloud TPU VM, as one value with the real defaults.

A Cloud TPU VM's sshd listens on `ssh_port` (its network endpoint's `port` is the TPU runtime's), its chips
are device files that libtpu locks, its metadata server is at a fixed address, and it installs the `tpu`
extra. A stand-in for the service whose workers are loopback sshds on ordinary machines (e.g.
grpoctl_testing.fake_tpu) passes its own values to the target's constructor; nobody configures these in
grpoctl.yaml (no real node works another way). Kept apart from tpu.py so that the CLI can carry one
without importing google-cloud-tpu.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpoctl_contract.watchdog as watchdog
from orchestrator.cloud.stale import LIBTPU_LOCKFILE, TPU_DEVICE_PATTERNS
from orchestrator.targets.topology import TPU_BOOTSTRAP_EXTRAS


@dataclass(frozen=True)
class TpuWiring:
    # False: every worker is reached on the config's `ssh_port`. True: on its network endpoint's `port`
    # (a stand-in that runs one sshd per worker on one address names each one's port there).
    ssh_port_from_endpoint: bool = False
    # What counts as "holding the TPU" on a worker (cloud/stale.py clears its holders before a launch).
    device_patterns: tuple[str, ...] = TPU_DEVICE_PATTERNS
    libtpu_lockfile: str = LIBTPU_LOCKFILE
    # The extras `sync` installs on the workers (CPU stand-ins have no chip for libtpu to drive).
    bootstrap_extras: tuple[str, ...] = TPU_BOOTSTRAP_EXTRAS
    # Where the node's idle watchdog asks for its token, and how often it looks for jobs.
    metadata_base: str = watchdog.METADATA_BASE
    autodelete_poll_s: float = 30.0


REAL_TPU_VM = TpuWiring()
