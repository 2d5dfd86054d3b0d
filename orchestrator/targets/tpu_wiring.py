"""TpuWiring: what TpuTarget assumes about a Cloud TPU VM and its service, as one value with real defaults.

A Cloud TPU VM's sshd listens on `ssh_port` (its network endpoint's `port` is the TPU runtime's), its chips
are device files that libtpu locks, its metadata server is at a fixed address, it installs the `tpu`
extra, and jax.distributed's coordinator listens on worker 0's customary port. The service answers in
seconds to minutes: reads and metadata updates back off that long, and a fresh VM's host keys may take
minutes to appear. A stand-in for the service whose workers are loopback sshds on ordinary machines (e.g.
grpoctl_testing.fake_tpu) passes its own values to the target's constructor; nobody configures these in
grpoctl.yaml (no real node works another way). Kept apart from tpu.py so that the CLI can carry one
without importing google-cloud-tpu.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpoctl_contract.watchdog as watchdog
from orchestrator.cloud.policy import CONFLICT_RETRY, READ_RETRY
from orchestrator.cloud.stale import LIBTPU_LOCKFILE, TPU_DEVICE_PATTERNS
from orchestrator.retry import Backoff
from orchestrator.targets.base import COORDINATOR_PORT
from orchestrator.targets.topology import TPU_BOOTSTRAP_EXTRAS

HOST_KEY_WAIT_S = 120.0  # a fresh VM publishes its host keys a little after READY


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
    # The port worker 0's jax.distributed coordinator listens on (a stand-in whose workers share one
    # address picks a free one, so two slices on one machine do not meet there).
    coordinator_port: int = COORDINATOR_PORT
    # How patient the target is with the service: its API client's reads on transient errors, metadata
    # updates that meet a concurrent one (409), and how long `up` waits for the workers' host keys.
    read_retry: Backoff = READ_RETRY
    conflict_retry: Backoff = CONFLICT_RETRY
    host_key_wait_s: float = HOST_KEY_WAIT_S


REAL_TPU_VM = TpuWiring()
