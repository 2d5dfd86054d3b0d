"""Orbax checkpoints of the train state, to a local folder or gs://, and resume from the latest one.

A checkpoint holds the array state (params, optimizer state, rng) restored with the live shardings, and a
small JSON `meta` (data position, W&B run id, anything host-side) so a restarted run continues exactly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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


def compile_cache_dir(
    configured: str | bool | None, checkpoint_base: str | None, run_dir: str | os.PathLike[str]
) -> str | None:
    """Where JAX keeps compiled programs across processes: shared by runs (programs are keyed by their
    HLO, compile options and backend, so a run only ever loads what it would have compiled itself)."""
    if configured is False:  # compile_cache_dir: false
        return None
    if isinstance(configured, str) and configured:
        return _abs_dir(configured)
    if checkpoint_base:
        return f"{_abs_dir(checkpoint_base).rstrip('/')}/compile_cache"
    return str(Path(os.path.abspath(run_dir)).parent / ".compile_cache")


def enable_compile_cache(directory: str | None) -> None:
    """Point JAX's persistent compilation cache at `directory` (None: off) before the first compile. Every
    program is cached, however fast it compiled: a restart pays for all of them again otherwise."""
    from jax._src import compilation_cache  # reset: the cache is bound to its folder at first use

    current = jax.config.jax_compilation_cache_dir
    if directory == current:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()


_STEP_KEY = "saved_step"  # written into every checkpoint's meta: what verification reads back


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager`: save(step, state, meta) / restore_latest(like).

    Every checkpoint is verified once it is written (its meta read back from storage, its step compared),
    and old ones are deleted only after a newer one has been verified: a save that dies half-way (a
    preempted VM, a full bucket) never costs the last good checkpoint. `keep` counts verified ones."""

    def __init__(self, directory: str, keep: int = 2, *, say: Callable[[str], None] | None = None):
        self.directory = _abs_dir(directory)
        self.keep = keep
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._pending: int | None = None  # saved, not yet verified
        self.verified: list[int] = []
        # max_to_keep=None: orbax deletes nothing itself (it would, before the new one is known good).
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied to host; call `wait()` before exiting. The
        previous save is finished and verified first."""
        self.wait()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, _STEP_KEY: step})
            ),
        )
        self._pending = step

    def verify(self, step: int) -> bool:
        """Whether the checkpoint of `step` reads back from storage as that step (its meta only: cheap)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"]).get(_STEP_KEY, step) == step
        except Exception:  # noqa: BLE001 - unreadable for any reason: not a checkpoint to rely on
            return False

    def _verify_pending(self) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return
        if not self.verify(step):
            self.say(f"checkpoint of step {step} did not read back: deleted; keeping step "
                     f"{self.verified[-1] if self.verified else 'none'}")
            self._manager.delete(step)
            return
        self.verified.append(step)
        newest = set(self.verified[-self.keep:])
        for old in self._manager.all_steps():
            if old < step and old not in newest:
                self._manager.delete(old)
        self.verified = [s for s in self.verified if s in newest]

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
        meta = dict(restored["meta"])
        meta.pop(_STEP_KEY, None)
        self.verified = [step]  # read back whole: it counts towards `keep` beside the next saves
        return step, restored["state"], meta

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._verify_pending()

    def close(self) -> None:
        self.wait()
        self._manager.close()
