"""Orbax checkpoints of the train state, to a local folder or gs://, and resume from the latest one.

A checkpoint holds the array state (params, optimizer state, rng) restored with the live shardings, and a
small JSON `meta` (data position, W&B run id, anything host-side) so a restarted run continues exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abs_dir(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


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

    def restore_latest(self, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the latest checkpoint with arrays placed like `like`; None if none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
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
