"""`python -m grpoctl_testing.fake_tpu_cli ARGS...`: grpoctl for a tpu target on the fake Cloud TPU API.

The real CLI, with the two things only the fake's workers need set on TpuTarget rather than in grpoctl.yaml
(no real node works so, so they are no user's configuration): each worker's sshd port comes from its
network endpoint (one loopback sshd per worker), and `sync` installs the trainer without the `tpu` extra
(the workers are CPU hosts: libtpu has no chip to drive). The rehearsal runs its SOP replay through this.
The fake's workers all share 127.0.0.1, so the jax.distributed coordinator port is a free one picked here:
two rehearsals at once on one machine otherwise meet on the customary port, and one's worker joins the
other's job ("tried to connect with a different incarnation").
"""

from __future__ import annotations

from grpoctl_testing.sshd import free_port
from orchestrator.cli import main
from orchestrator.ops import launch
from orchestrator.targets.tpu import TpuTarget


def wire_to_fake_workers() -> None:
    TpuTarget.ssh_port_from_endpoint = True
    TpuTarget.bootstrap_extras = ("trainer",)
    launch.COORDINATOR_PORT = free_port()


if __name__ == "__main__":
    wire_to_fake_workers()
    main()
