"""`python -m grpoctl_testing.fake_tpu_cli ARGS...`: grpoctl for a tpu target on the fake Cloud TPU API.

The real CLI, told (through `main(tpu_wiring=...)`, not grpoctl.yaml: no real node works so, so they are
no user's configuration) what the fake's VMs are like: each worker's sshd port comes from its network
endpoint (one loopback sshd per worker), and `sync` installs the trainer without the `tpu` extra (the
workers are CPU hosts: libtpu has no chip to drive). The rehearsal runs its SOP replay through this.
The fake's workers all share 127.0.0.1, so the jax.distributed coordinator port is a free one picked here
(the wiring's `coordinator_port`): two rehearsals at once on one machine otherwise meet on the customary
port, and one's worker joins the other's job ("tried to connect with a different incarnation"). The
retry policies and waits stay the real ones here: the rehearsal measures what a user would wait.
"""

from __future__ import annotations

import dataclasses

from grpoctl_testing.sshd import free_port
from orchestrator.cli import main
from orchestrator.retry import Backoff
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring

# Backoffs of milliseconds, not seconds, for tests against the fake (which answers at once): the same code
# path, a shorter policy.
QUICK_RETRY = Backoff(attempts=6, first_s=0.01, max_s=0.05)


def fake_vm_wiring(
    *,
    metadata_base: str | None = None,
    cpu_workers: bool = False,
    quick_retries: bool = False,
    coordinator_port: int | None = None,
) -> TpuWiring:
    """What a VM of the fake API is like: its sshd on the port its network endpoint names; with
    `metadata_base` (the fake's endpoint) its watchdog asks the fake for a token; with `cpu_workers`,
    `sync` installs the trainer alone (no libtpu); with `quick_retries`, reads and metadata updates back off
    for milliseconds (QUICK_RETRY); with `coordinator_port`, jax.distributed's coordinator listens there."""
    wiring = dataclasses.replace(REAL_TPU_VM, ssh_port_from_endpoint=True)
    if metadata_base is not None:
        wiring = dataclasses.replace(wiring, metadata_base=metadata_base)
    if cpu_workers:
        wiring = dataclasses.replace(wiring, bootstrap_extras=("trainer",))
    if quick_retries:
        wiring = dataclasses.replace(wiring, read_retry=QUICK_RETRY, conflict_retry=QUICK_RETRY)
    if coordinator_port is not None:
        wiring = dataclasses.replace(wiring, coordinator_port=coordinator_port)
    return wiring


if __name__ == "__main__":
    main(fake_vm_wiring(cpu_workers=True, coordinator_port=free_port()))
