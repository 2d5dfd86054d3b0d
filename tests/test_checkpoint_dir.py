"""Where runs keep checkpoints: per run under a shared `checkpoint.dir` (a bucket that outlives the VM)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from trainer.checkpoints import Checkpointer, checkpoint_dir


def test_default_is_the_run_dir_and_a_shared_dir_gets_one_folder_per_run() -> None:
    assert checkpoint_dir(None, "runs/r1") == str(Path("runs/r1/checkpoints"))
    assert checkpoint_dir("gs://bucket/ckpt/", "/home/u/w/runs/r1") == "gs://bucket/ckpt/r1"
    assert checkpoint_dir("gs://bucket/ckpt", "runs/r2/") == "gs://bucket/ckpt/r2"


def test_two_runs_sharing_a_bucket_never_resume_each_other(tmp_path: Path) -> None:
    """Found by the rehearsal: both SOP runs set the same `checkpoint.dir`, and the second one restored the
    first one's final checkpoint (and ended at once). A file:// URL stands in for gs:// here."""
    bucket = f"file://{tmp_path / 'bucket'}"
    state = {"w": jnp.arange(4.0)}
    first = Checkpointer(checkpoint_dir(bucket, tmp_path / "vm1" / "runs" / "jax-run"))
    first.save(5, state, {"data": 1})
    first.close()
    second = Checkpointer(checkpoint_dir(bucket, tmp_path / "vm1" / "runs" / "pallas-run"))
    assert second.restore_latest(state) is None
    second.close()
    # The same run relaunched on a recreated VM (another disk, same run id) finds its own checkpoint.
    again = Checkpointer(checkpoint_dir(bucket, tmp_path / "vm2" / "runs" / "jax-run"))
    restored = again.restore_latest(state)
    again.close()
    assert restored is not None and restored[0] == 5 and restored[2] == {"data": 1}
    assert (tmp_path / "bucket" / "jax-run" / "5").is_dir()


def test_restore_places_uncommitted_leaves_on_the_mesh_not_on_device_zero(tmp_path: Path) -> None:
    """Found by the rehearsal: a run resumed on a 2-process mesh failed its first update with "incompatible
    devices": the optimizer state, which `jit(init)` leaves uncommitted, came back committed to device 0."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    params = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, PartitionSpec("fsdp")))
    state = {"params": params, "opt": jnp.zeros(8)}  # uncommitted, like optax's jitted init output
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, state, {})
    ckpt.close()
    restored = Checkpointer(str(tmp_path / "ckpt")).restore_latest(
        state, free_sharding=NamedSharding(mesh, PartitionSpec())
    )
    assert restored is not None
    _, back, _ = restored
    total = jax.jit(lambda p, o: p + o)(back["params"], back["opt"])  # fails if "opt" sits on device 0
    assert float(total.sum()) == 28.0
