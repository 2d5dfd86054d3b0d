"""What the launcher tells each worker's trainer about its peers (multi-host jax.distributed)."""

from orchestrator.ops.launch import COORDINATOR_PORT, worker_env
from orchestrator.targets.base import Worker


def test_single_worker_gets_no_distributed_setup() -> None:
    env = worker_env("r1", 0, [Worker(0, "10.0.0.5")])
    assert env == {"GRPOCTL_RUN_ID": "r1", "GRPOCTL_WORKER": "0"}


def test_ssh_hosts_use_worker_zero_as_coordinator() -> None:
    workers = [Worker(0, "10.0.0.5"), Worker(1, "10.0.0.6", 2222)]
    env = worker_env("r1", 1, workers)
    assert env["GRPOCTL_DISTRIBUTED"] == "1"
    assert env["GRPOCTL_NUM_PROCESSES"] == "2"
    assert env["GRPOCTL_PROCESS_ID"] == "1"
    assert env["JAX_COORDINATOR_ADDRESS"] == f"10.0.0.5:{COORDINATOR_PORT}"


def test_tpu_slices_name_worker_zero_internal_ip_as_coordinator() -> None:
    # Found by the rehearsal: without an address, jax.distributed.initialize() on workers that are not
    # real TPU VMs (no TPU metadata to discover peers from) fails; worker 0's internal IP is what a
    # slice's peers reach it by (its external IP may be firewalled).
    workers = [Worker(i, f"34.1.0.{i}", peer_host=f"10.0.0.{i}") for i in range(4)]
    env = worker_env("r1", 3, workers)
    assert env["GRPOCTL_PROCESS_ID"] == "3" and env["GRPOCTL_NUM_PROCESSES"] == "4"
    assert env["JAX_COORDINATOR_ADDRESS"] == f"10.0.0.0:{COORDINATOR_PORT}"


def test_the_targets_coordinator_port_is_the_one_named() -> None:
    # A stand-in whose workers share one address (the rehearsal's fake VMs) names a free port in its
    # TpuWiring; the target carries it and the launcher passes it on.
    from grpoctl_testing.fake_tpu_cli import fake_vm_wiring
    from orchestrator.config import RepoConfig, TpuTargetConfig
    from orchestrator.targets.tpu import TpuTarget

    workers = [Worker(0, "127.0.0.1", 2201), Worker(1, "127.0.0.1", 2202)]
    assert worker_env("r1", 1, workers, 40123)["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:40123"
    cfg = TpuTargetConfig(kind="tpu", project="p", zone="us-east1-d", name="n", accelerator_type="v6e-16")
    wiring = fake_vm_wiring(coordinator_port=40123)
    assert TpuTarget("tpu", cfg, RepoConfig(), wiring=wiring).coordinator_port == 40123
    assert TpuTarget("tpu", cfg, RepoConfig()).coordinator_port == COORDINATOR_PORT
