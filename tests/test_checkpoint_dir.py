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


def test_checkpoints_are_verified_and_the_last_good_one_outlives_a_bad_save(tmp_path: Path, monkeypatch):
    state = {"w": jnp.arange(4.0)}
    said: list[str] = []
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, say=said.append)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    ckpt.wait()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
    assert ckpt.verified == [2, 3] and not said
    # A save that does not read back (a torn write, a bucket that lost it) is dropped, and nothing older
    # is deleted for it: the run resumes from the last good one.
    monkeypatch.setattr(Checkpointer, "verify", lambda self, step: step != 4)
    ckpt.save(4, state, {"step": 4})
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
    assert said and "step 4 did not read back" in said[0] and "keeping step 3" in said[0]
    monkeypatch.undo()
    again = Checkpointer(str(tmp_path / "ckpt"))
    restored = again.restore_latest(state)
    assert restored is not None and restored[0] == 3 and restored[2] == {"step": 3}
    # verify() itself reads the meta back from storage: a meta that names another step fails it
    meta = next((tmp_path / "ckpt" / "3" / "meta").glob("*"))
    meta.write_text(meta.read_text().replace('"saved_step": 3', '"saved_step": 9'))
    assert again.verify(2) and not again.verify(3)
    again.close()


def test_the_compile_cache_lives_beside_the_checkpoints_and_can_be_turned_off(tmp_path: Path) -> None:
    from trainer.checkpoints import compile_cache_dir
    from trainer.config import load

    assert load("configs/tiny_cpu.yaml", []).compile_cache_dir is None  # declared once, default null
    # beside a shared checkpoint.dir: it survives a recreated VM, and the SOP's next run finds it
    assert compile_cache_dir(None, "gs://b/ckpt/", "runs/r1") == "gs://b/ckpt/compile_cache"
    assert compile_cache_dir(None, f"file://{tmp_path}/b", "runs/r1") == f"{tmp_path}/b/compile_cache"
    on_disk = compile_cache_dir(None, None, tmp_path / "runs" / "r1")
    assert on_disk == str(tmp_path / "runs" / ".compile_cache")
    assert compile_cache_dir("gs://c/x", "gs://b", "runs/r1") == "gs://c/x"
    assert compile_cache_dir(False, "gs://b", "runs/r1") is None
    assert load("configs/tiny_cpu.yaml", ["compile_cache_dir=false"]).compile_cache_dir is False


def test_a_resumed_run_keeps_the_checkpoint_it_resumed_from_beside_its_first_new_one(tmp_path: Path):
    """`keep` counts verified checkpoints; the one a restart restored was read back whole, so it counts:
    after a preemption the run still holds `keep` checkpoints, not only its first new save."""
    state = {"w": jnp.arange(4.0)}
    first = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2):
        first.save(step, state, {"step": step})
    first.close()
    resumed = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert resumed.restore_latest(state)[0] == 2
    resumed.save(3, state, {"step": 3})
    resumed.close()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
