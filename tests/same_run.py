"""Two run directories hold the same run, to the bit: the determinism checks' one comparison.

Every metric row of metrics.jsonl (step by step, every key but wall-clock times) and every row of each
eval_full*.jsonl (per-question prediction and correctness) must be equal, floats compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from grpoctl_contract import rundir

# A short tiny_cpu.yaml run that still has every phase: a 30-step warm start, the start sweep, 4 GRPO steps
# with an eval after steps 2 and 4, checkpoints after steps 2 and 4, a 2-batch final sweep of 16 questions.
# tests/test_phases_e2e.py launches it through `grpoctl run`, tests/test_determinism.py runs it directly
# (one pytest process shares the compiled programs between them).
TINY_SETTINGS = (
    "steps=4",
    "warm_start.steps=30",
    "eval_every_steps=2",
    "eval_full_limit=16",
    "eval_full_batch_size=8",
    "checkpoint.every_steps=2",
    "wandb_mode=disabled",
)

# Wall-clock figures differ between any two runs; everything else a run logs must not.
CLOCK_KEYS = ("time/", "train/rollout_tokens_per_s")


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(CLOCK_KEYS)} for row in rows]


def sweep_rows(run_dir: Path, name: str) -> list[str]:
    return (run_dir / name).read_text().splitlines()


def assert_same_run(got: Path, want: Path) -> None:
    a, b = metric_rows(got), metric_rows(want)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a == row_b, {k: (row_a.get(k), row_b.get(k)) for k in row_a | row_b
                                if row_a.get(k) != row_b.get(k)}
    assert any("loss" in r for r in b) and any("train/reward/total/mean" in r for r in b)
    for name in (rundir.EVAL_FULL_START_ROWS, rundir.EVAL_FULL_ROWS):
        rows = sweep_rows(want, name)
        assert rows, name  # the comparison is not vacuous
        assert sweep_rows(got, name) == rows, name
