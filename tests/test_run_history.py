"""Issue 20: a run's metrics history survives its VM. The trainer's RunLogger keeps every metrics.jsonl row
in each checkpoint's meta; a run resumed on a recreated VM (a fresh, empty run dir) gets them back, so its
metrics.jsonl has every step and its summary the same keys as a run that was never interrupted."""

from __future__ import annotations

import json
from pathlib import Path

from grpoctl_contract import rundir
from trainer.metrics import RunLogger


def _logger(run_dir: Path) -> RunLogger:
    return RunLogger(run_dir, config={}, config_hash="h", wandb_mode="disabled", wandb_project="p",
                     wandb_name=None)


def _steps(logger: RunLogger, steps: range) -> None:
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, "time/train/step_s": 0.5,
                          "time/train/step_avg_last10_s": 0.5})


def test_a_run_resumed_on_a_fresh_disk_keeps_every_metrics_row_and_summary_key(tmp_path: Path) -> None:
    clean = _logger(tmp_path / "clean")
    _steps(clean, range(1, 9))
    clean.finish(8)

    first = _logger(tmp_path / "vm1" / "run")
    _steps(first, range(1, 6))
    meta = {"metrics": first.history()[:4]}  # checkpointed at step 4; step 5 was lost with the VM
    resumed = _logger(tmp_path / "vm2" / "run")  # a recreated VM: an empty run dir
    resumed.restore_history(meta["metrics"])
    assert resumed.resume_history(4, "time/train/step_s") == [0.5] * 4
    _steps(resumed, range(5, 9))
    resumed.finish(8)

    rows = [json.loads(x) for x in (tmp_path / "vm2" / "run" / rundir.METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # every step once
    keys = set(json.loads((tmp_path / "clean" / rundir.SUMMARY).read_text()))
    assert set(json.loads((tmp_path / "vm2" / "run" / rundir.SUMMARY).read_text())) == keys


def test_a_run_dir_that_kept_its_rows_is_not_overwritten_by_an_older_checkpoint(tmp_path: Path) -> None:
    logger = _logger(tmp_path / "run")
    _steps(logger, range(1, 7))
    logger.restore_history([{"step": 1, "loss": 1.0}])
    assert len(logger.history()) == 6
