"""Determinism: the same config and seed on this machine reproduce a run to the bit, every metric row
(losses, rewards, grad norms, entropies, eval rewards) and every per-question row of both full sweeps.

Two direct runs, and a run that crashed and resumed from its checkpoint against one that never stopped.
The same check through `grpoctl run` on the local target is in tests/test_phases_e2e.py (it reuses that
module's run). Where determinism cannot be promised (other machines, GPU atomics, TPU collectives):
docs/trainer-config.md, "Determinism".
"""

from __future__ import annotations

from pathlib import Path

import pytest
from same_run import TINY_SETTINGS, assert_same_run

pytest.importorskip("jax", reason="runs the real trainer (tiny model on CPU): needs the trainer extra")

from trainer import config as C  # noqa: E402
from trainer.train import run  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> C.Config:
    return C.load(ROOT / "configs" / "tiny_cpu.yaml", TINY_SETTINGS, environ={})


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    run(tiny(), run_dir)
    return run_dir


def test_two_runs_of_one_config_and_seed_are_the_same_run(reference, tmp_path):
    run(tiny(), tmp_path)
    assert_same_run(tmp_path, reference)


def test_a_different_seed_is_a_different_run(reference, tmp_path):
    """The comparison can fail: seed 1 changes the init, the data order and the samples."""
    run(C.replace(tiny(), "seed=1", "steps=1", "eval_full_sweep=false"), tmp_path)
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path, reference)


def test_a_run_resumed_from_its_checkpoint_is_the_uninterrupted_run(reference, tmp_path):
    def crash_in_step_3(step: int, metrics: dict) -> None:
        if step == 3:  # checkpointed after step 2 (every 2 steps); step 3 is lost with the process
            raise Crash

    with pytest.raises(Crash):
        run(tiny(), tmp_path, on_step=crash_in_step_3)
    seen: list[int] = []
    run(tiny(), tmp_path, on_step=lambda step, m: seen.append(step))
    assert seen == [3, 4]  # resumed after the checkpoint of step 2: no warm start, no start sweep again
    assert_same_run(tmp_path, reference)
