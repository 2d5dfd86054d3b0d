"""Orbax checkpoints of the train state, to a local folder or gs://, and resume from the latest one.

A checkpoint holds the array state (params, optimizer state, rng) restored with the live shardings, and a
small JSON `meta` (data position, W&B run id, anything host-side) so a restarted run continues exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abs_dir(path: str) -> str:
    if path.startswith("file://"):  # a local folder written as a URL (the rehearsal's stand-in bucket)
        path = path[len("file://") :]
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(configured: str | None, run_dir: str | os.PathLike[str]) -> str:
    """Where a run's checkpoints live: `<run_dir>/checkpoints`, or `<checkpoint.dir>/<run name>`.

    `checkpoint.dir` is shared by runs (one bucket for an SOP's runs): each run gets its own folder named
    after its run dir (the run id, which a relaunch after preemption keeps), so a second run never
    resumes from the first one's checkpoints, and a recreated VM, whose disk is new, finds its own.
    """
    if not configured:
        return str(Path(run_dir) / "checkpoints")
    name = Path(os.path.abspath(run_dir)).name
    return f"{configured.rstrip('/')}/{name}"


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager`: save(step, state, meta) / restore_latest(like)."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = _abs_dir(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied to host; call `wait()` before exiting."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )

    def restore_latest(
        self, like: Any, free_sharding: jax.sharding.Sharding | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the latest checkpoint with arrays placed like `like`; None if none.

        Leaves of `like` that are not committed to a placement (e.g. the optimizer state `jit(init)` left on
        the default device for the first update to place) are restored with `free_sharding` (e.g. replicated
        over the mesh): restored onto device 0 they would be committed there, and a jitted step mixing them
        with mesh-sharded params fails ("incompatible devices") as soon as the mesh spans several devices.
        """
        step = self._manager.latest_step()
        if step is None:
            return None

        def target(x: Any) -> Any:
            if free_sharding is not None and isinstance(x, jax.Array) and not getattr(x, "_committed", True):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=free_sharding)
            return ocp.utils.to_shape_dtype_struct(x)

        abstract = jax.tree.map(target, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return step, restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
